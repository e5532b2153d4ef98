# frozen_string_literal: true

module Pyroscope
  # Rails auto-instrumentation, as in the `pyroscope` gem: every controller action runs
  # inside tag_wrapper({ "action" => "controller/action" }) while profiling is configured
  # with autoinstrument_rails (the default). The flag is read per request, so configuring
  # after the controllers load, or turning it off, takes effect at once.
  module RailsInstrumentation
    module_function

    def instrument(controller_class)
      controller_class.around_action do |controller, action|
        config = Pyroscope.current_config
        if config&.autoinstrument_rails
          Pyroscope.tag_wrapper({ "action" => "#{controller.controller_name}/#{controller.action_name}" }, &action)
        else
          action.call
        end
      end
    end
  end

  if defined?(::Rails::Railtie)
    class Railtie < ::Rails::Railtie
      initializer "pyroscope.autoinstrument_rails" do
        ActiveSupport.on_load(:action_controller) { Pyroscope::RailsInstrumentation.instrument(self) }
      end
    end
  end
end
