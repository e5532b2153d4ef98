# frozen_string_literal: true

require "uri"
require "opentelemetry/sdk"
require "pyroscope"

module Pyroscope
  # Span profiles: the `pyroscope-otel` gem's SpanProcessor, drop-in. Each local root span
  # (or every span) labels the samples taken while it is active with its id and name, and
  # carries the attributes Grafana uses to link the span to those samples.
  module Otel
    VERSION = Pyroscope::VERSION

    class Error < StandardError; end

    # Where the OpenTelemetry gems' code lives: never the leaf of a span's charged stack.
    def self.opentelemetry_paths
      Gem.loaded_specs.each_value.select { |spec| spec.name.start_with?("opentelemetry") }.map { |spec| "#{spec.full_gem_path}/" }
    end

    # OpenTelemetry span processor. Labels live in the extension's slot of the fiber that
    # started the span (the OTel context is per fiber), and on_finish removes exactly what
    # on_start set, wherever and under whatever name the span finishes.
    class SpanProcessor < OpenTelemetry::SDK::Trace::SpanProcessor
      PROFILE_ID = "pyroscope.profile.id"
      PROFILE_URL = "pyroscope.profile.url"
      LABEL_NAME = /\A[A-Za-z0-9_.]+\z/ # the server's label name grammar
      ACTIVE = :@__pyroscope_otel_labels # on a labelled span: its Native::SpanLabels
      URL_WINDOW = 3600 # seconds the profile link's time range spans

      attr_accessor :root_span_only, :add_span_name, :add_url, :add_trace_id
      attr_reader :span_id_label, :span_name_label, :trace_id_label

      # app_name and pyroscope_endpoint default to Pyroscope.current_config's (read when a
      # span starts, so the processor may be built before Pyroscope.configure).
      #   root_span_only:  label only local root spans (parent invalid or remote)
      #   add_span_name:   also label the span name
      #   add_url:         set the span attribute pyroscope.profile.url
      #   add_trace_id:    also label the trace id (32 hex)
      #   span_id_label, span_name_label, trace_id_label: label names; "profile_id" (which
      #     the server renames span_id) and "span" as upstream, or e.g. "span_id"/"span_name"
      def initialize(app_name = nil, pyroscope_endpoint = nil, root_span_only: true, add_span_name: true, add_url: true,
                     add_trace_id: false, span_id_label: "profile_id", span_name_label: "span", trace_id_label: "trace_id")
        super()
        self.app_name = app_name
        self.pyroscope_endpoint = pyroscope_endpoint
        @root_span_only = root_span_only
        @add_span_name = add_span_name
        @add_url = add_url
        @add_trace_id = add_trace_id
        @span_id_label = label_name(:span_id_label, span_id_label)
        @span_name_label = label_name(:span_name_label, span_name_label)
        @trace_id_label = label_name(:trace_id_label, trace_id_label)
        names = [@span_id_label, @span_name_label, @trace_id_label]
        raise ArgumentError, "span_id_label, span_name_label and trace_id_label must differ, got #{names}" if names.uniq.size < 3

        Native.add_own_paths(*Otel.opentelemetry_paths)
        # unsampled short spans take stacks of spans of their kind: the same labels but these
        Native.add_id_label(@span_id_label)
        Native.add_id_label(@trace_id_label)
      end

      # Without one given: the name the profiles go under (Pyroscope.current_config's, which
      # follows OpenTelemetry's service name), with upstream's ".cpu" profile type suffix.
      def app_name
        return @app_name if @app_name

        config = Pyroscope.current_config
        "#{config ? config.effective_name : ServiceName.resolve("")}.cpu"
      end

      def app_name=(name)
        unless name.nil? || name.is_a?(String)
          raise ArgumentError, "app_name must be a String (or nil for Pyroscope.current_config's), got #{name.inspect}"
        end

        @app_name = name
        @url_parts = nil
      end

      # A parsed URI, as upstream.
      def pyroscope_endpoint
        @pyroscope_endpoint || URI(Pyroscope.current_config&.server_address || Config.new.server_address)
      end

      def pyroscope_endpoint=(endpoint)
        @pyroscope_endpoint = endpoint.nil? ? nil : parse_endpoint(endpoint)
        @url_parts = nil
      end

      def on_start(span, parent_context)
        return if @root_span_only && !local_root?(span, parent_context)

        context = span.context
        id = context.hex_span_id
        labels = [@span_id_label, id]
        labels.push(@span_name_label, span.name) if @add_span_name
        labels.push(@trace_id_label, context.hex_trace_id) if @add_trace_id
        token = Native.push_span(*labels)
        span.instance_variable_set(ACTIVE, token)
        url = @add_url && profile_url(id)
        span.add_attributes(url ? { PROFILE_ID => id, PROFILE_URL => url } : { PROFILE_ID => id })
      rescue StandardError => e
        OpenTelemetry.handle_error(exception: e, message: "pyroscope-otel: cannot label span")
      end

      def on_finish(span)
        token = span.instance_variable_get(ACTIVE)
        Native.pop_span(token) if token
      rescue StandardError => e
        OpenTelemetry.handle_error(exception: e, message: "pyroscope-otel: cannot remove span labels")
      end

      def force_flush(timeout: nil) # rubocop:disable Lint/UnusedMethodArgument
        OpenTelemetry::SDK::Trace::Export::SUCCESS
      end

      def shutdown(timeout: nil) # rubocop:disable Lint/UnusedMethodArgument
        OpenTelemetry::SDK::Trace::Export::SUCCESS
      end

      private

      def local_root?(span, parent_context)
        return true if span.respond_to?(:parent_span_id) && span.parent_span_id == OpenTelemetry::Trace::INVALID_SPAN_ID

        parent = OpenTelemetry::Trace.current_span(parent_context).context
        !parent.valid? || parent.remote?
      end

      # upstream's link: the endpoint with query=<app>{<span id label>="<id>"}&from=<now>&until=<now + 1 h>,
      # form-encoded; the parts around the id and the times are built once
      def profile_url(id)
        config = Pyroscope.current_config
        @url_parts = nil unless @url_config.equal?(config) # app name and endpoint may come from it
        @url_config = config
        head, tail = (@url_parts ||= url_parts)
        return unless head

        now = Process.clock_gettime(Process::CLOCK_REALTIME, :second)
        # what follows the id changes once a second (or with the parts)
        @url_tail = [now, tail, "#{tail}&from=#{now}&until=#{now + URL_WINDOW}"] unless @url_tail && @url_tail[0] == now && @url_tail[1].equal?(tail)
        "#{head}#{id}#{@url_tail[2]}"
      end

      def url_parts
        endpoint = pyroscope_endpoint
        return [] unless endpoint.is_a?(URI::HTTP)

        query = URI.encode_www_form(query: "#{app_name}{#{@span_id_label}=\"\u0000\"}")
        head, tail = query.split("%00", 2)
        url = endpoint.dup
        url.query = nil
        ["#{url}?#{head}", tail]
      end

      def parse_endpoint(endpoint)
        uri = case endpoint
              when URI::Generic then endpoint
              when String then (URI(endpoint) rescue nil) # rubocop:disable Style/RescueModifier
              end
        return uri if uri.is_a?(URI::HTTP) && uri.host && !uri.host.empty?

        raise ArgumentError, "pyroscope_endpoint must be an http(s) URL like http://localhost:4040, got #{endpoint.inspect}"
      end

      def label_name(option, name)
        return name if name.is_a?(String) && name.match?(LABEL_NAME)

        raise ArgumentError, "#{option} must be a label name of letters, digits, '_' and '.', got #{name.inspect}"
      end
    end
  end
end
