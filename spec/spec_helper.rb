# frozen_string_literal: true

$LOAD_PATH.unshift File.expand_path("../lib", __dir__)
require "pyroscope"
Dir[File.join(__dir__, "support", "**", "*.rb")].sort.each { |f| require f }

RSpec.configure do |config|
  config.disable_monkey_patching!
  config.order = :random
  Kernel.srand config.seed
  config.include ProfileHelpers

  # A hung example ends the run within minutes, showing where every thread was, instead of
  # running into CI's time limit with nothing to show.
  limit = Float(ENV.fetch("SPEC_EXAMPLE_TIMEOUT", "240"))
  current = nil
  config.before { |ex| current = [ex.full_description, Process.clock_gettime(Process::CLOCK_MONOTONIC)] }
  config.after { current = nil }
  Thread.new do
    Thread.current.name = "spec watchdog"
    loop do
      sleep 5
      name, started = current
      next unless started && Process.clock_gettime(Process::CLOCK_MONOTONIC) - started > limit

      warn "\n== spec watchdog: #{name.inspect} still running after #{limit} s; threads:"
      Thread.list.each { |t| warn "-- #{t.inspect}", *(t.backtrace || []).first(40).map { |l| "   #{l}" } }
      $stderr.flush
      Process.exit!(1)
    end
  end

  # Every example starts from a stopped sampler, an empty window and no labels.
  config.after do
    Pyroscope::Native.stop
    Pyroscope::Native.take_window
    Pyroscope::Native.clear_labels
  end
end
