# frozen_string_literal: true

require_relative "pyroscope/version"
require_relative "pyroscope/native"
require_relative "pyroscope/exporter"
require_relative "pyroscope/service_name"
require_relative "pyroscope/config"
require_relative "pyroscope/api"
require_relative "pyroscope/stats"
require_relative "pyroscope/rails"
