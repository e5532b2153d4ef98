# frozen_string_literal: true

require_relative "lib/pyroscope/version"

Gem::Specification.new do |spec|
  spec.name = "pyroscope-otel"
  spec.version = Pyroscope::VERSION
  spec.summary = "In-process CPU profiler for Ruby with OpenTelemetry span profiles for Grafana Pyroscope"
  spec.description = <<~DESC
    A native CPU sampler that labels every sample with the OpenTelemetry span active on its
    thread and uploads the profiles to Grafana Pyroscope. A drop-in for the `pyroscope` and
    `pyroscope-otel` gems: no ptrace, no rbspy, every Ruby from 3.1 on, fork-safe.
  DESC
  spec.license = "Apache-2.0"
  spec.authors = ["pyroscope-otel developers"]
  spec.homepage = "https://github.com/pyroscope-otel/pyroscope-otel"
  spec.required_ruby_version = ">= 3.1"

  # What a user's build and the CLI need, and the docs; never spec/, bench/, bin/ or tmp/
  # (spec/gem_install_spec.rb checks the list). The flame graph assets are fetched and
  # verified by `rake assets`, which `rake build` runs first.
  spec.files = Dir["lib/**/*.rb", "lib/pyroscope/flamegraph/assets/*", "ext/pyroscope_otel/*.{c,h,rb,md}", "exe/*",
                   "README.md", "CHANGELOG.md", "LICENSE"]
  spec.bindir = "exe"
  spec.executables = Dir["exe/*"].map { |f| File.basename(f) }
  spec.require_paths = ["lib"]
  spec.extensions = ["ext/pyroscope_otel/extconf.rb"]

  spec.add_dependency "opentelemetry-api", "~> 1.0"
  spec.add_dependency "opentelemetry-sdk", "~> 1.0"
end
