# frozen_string_literal: true

module Pyroscope
  # The name profiles go under (the server's `service_name`), which must be the span's
  # `service.name` for Grafana's traces-to-profiles to find them: Grafana maps the span's
  # `service.name` to the profiles' `service_name`. So without an application_name of its
  # own, the gem takes OpenTelemetry's service name: the SDK's resource `service.name` once
  # the SDK is configured (what the spans carry: it already includes OTEL_SERVICE_NAME and
  # OTEL_RESOURCE_ATTRIBUTES, and a service_name set in code wins over them there too),
  # before that OTEL_SERVICE_NAME. It is read again for every window, so an SDK configured
  # after Pyroscope.configure still names the profiles.
  module ServiceName
    # OpenTelemetry's name for a service that has none: the SDK's default resource says so,
    # and so do the spans of an SDK configured without one.
    UNKNOWN = "unknown_service"
    INVALID = %r{[^A-Za-z0-9_.\-/]} # what the server's app name grammar does not take

    @warned = {}
    @lock = Mutex.new

    class << self
      # `own`: the application_name (or app_name) set, "" when none. Returns the name to
      # upload under.
      def resolve(own)
        otel = otel_name
        if own.to_s.empty?
          return UNKNOWN unless otel

          name = otel.gsub(INVALID, "_")
          warn_differs(name, otel, "service.name #{otel.inspect} has characters app names cannot hold") if name != otel
          name
        else
          warn_differs(own, otel, "application_name #{own.inspect} is not the OpenTelemetry service.name #{otel.inspect}") if otel && otel != own
          own
        end
      end

      # Whether a name can still come from OpenTelemetry when none is known yet: its SDK is
      # loaded, so its configure (which sets the resource) may come later.
      def pending?
        !!defined?(OpenTelemetry::SDK)
      end

      # OpenTelemetry's service name, or nil while none is known.
      def otel_name(env = ENV)
        provider = defined?(OpenTelemetry) && OpenTelemetry.tracer_provider
        if provider.respond_to?(:resource) # the SDK's provider: configured
          name = provider.resource.attribute_enumerator.find { |key, _| key == "service.name" }&.last.to_s
          return name unless name.empty?
        end
        name = env["OTEL_SERVICE_NAME"].to_s
        name.empty? ? nil : name
      end

      private

      # Once per pair of names, as a Ruby warning (seen at the default log_level, which is
      # "error"): the link in Grafana breaks silently otherwise.
      def warn_differs(name, otel, why)
        first = @lock.synchronize { @warned[[name, otel]] ? false : (@warned[[name, otel]] = true) }
        return unless first

        warn(
          "pyroscope: #{why}: profiles go under service_name #{name.inspect}, but Grafana's traces-to-profiles " \
          "maps the span's service.name to service_name and finds none. Set them equal (or leave " \
          "application_name unset), or give the Tempo data source's Trace to profiles a custom query " \
          "(jsonData.tracesToProfiles: customQuery: true, query: 'service_name=\"#{name}\"') instead of the " \
          "service.name -> service_name tag mapping"
        )
      end
    end
  end
end
