# frozen_string_literal: true

require_relative "pyroscope/version"
require_relative "pyroscope/native"
require_relative "pyroscope/exporter"
