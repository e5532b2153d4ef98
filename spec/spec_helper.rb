# frozen_string_literal: true

$LOAD_PATH.unshift File.expand_path("../lib", __dir__)
require "pyroscope"
Dir[File.join(__dir__, "support", "**", "*.rb")].sort.each { |f| require f }

RSpec.configure do |config|
  config.disable_monkey_patching!
  config.order = :random
  Kernel.srand config.seed
  config.include ProfileHelpers

  # Every example starts from a stopped sampler, an empty window and no labels.
  config.after do
    Pyroscope::Native.stop
    Pyroscope::Native.take_window
    Pyroscope::Native.clear_labels
  end
end
