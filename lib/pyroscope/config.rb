# frozen_string_literal: true

require "logger"

module Pyroscope
  # The `pyroscope` gem's Config, member for member (0.5–0.6 and 1.x), plus this gem's own
  # options. A Struct, as upstream, so `config.app_name = ...` and `config[:tags]` both work.
  Config = Struct.new(
    :application_name, :app_name, :server_address, :auth_token, :basic_auth_username, :basic_auth_password,
    :tenant_id, :sample_rate, :detect_subprocesses, :oncpu, :report_pid, :report_thread_id, :log_level, :tags,
    :compression, :report_encoding, :autoinstrument_rails, :http_headers,
    # this gem's own
    :logger, :upload_interval, :connect_timeout, :timeout, :queue_max_windows, :queue_max_bytes, :max_depth,
    :max_samples, :exit_timeout, :local_max_bytes, :no_signals, :ca_file, :profile_types, :wall_scope
  ) do
    def initialize(*)
      super
      self.application_name ||= ""
      self.server_address ||= "http://localhost:4040"
      self.auth_token ||= ""
      self.basic_auth_username ||= ""
      self.basic_auth_password ||= ""
      self.tenant_id ||= ""
      self.sample_rate ||= Native::DEFAULT_SAMPLE_RATE
      self.detect_subprocesses = false if detect_subprocesses.nil?
      self.oncpu = true if oncpu.nil?
      self.report_pid = false if report_pid.nil?
      self.report_thread_id = false if report_thread_id.nil?
      self.log_level ||= "error"
      self.tags ||= {}
      self.compression ||= "gzip"
      self.report_encoding ||= "pprof"
      self.autoinstrument_rails = true if autoinstrument_rails.nil?
      self.http_headers ||= {}
      self.upload_interval ||= 10
      self.connect_timeout ||= 5
      self.timeout ||= 10
      self.queue_max_windows ||= 12
      self.queue_max_bytes ||= 64 << 20
      self.max_depth ||= Native::DEFAULT_MAX_DEPTH
      self.max_samples ||= Native::DEFAULT_MAX_SAMPLES
      self.exit_timeout ||= 5
      self.local_max_bytes ||= 256 << 20
      self.no_signals = false if no_signals.nil?
      self.profile_types ||= [:cpu]
      self.wall_scope ||= :labelled
    end

    PROFILE_TYPES = %i[cpu wall].freeze
    # :labelled: a thread's wall time only while it has labels (a span, tags), so that idle
    # workers waiting on a queue do not fill the wall profile; :all: every thread's.
    WALL_SCOPES = %i[labelled all].freeze

    def wall?
      Array(profile_types).map { |t| t.to_s.to_sym }.include?(:wall)
    end

    # Environment variables the `pyroscope` gem and its agents read, and the member each
    # sets. They win over what the configure block set (so operators can redirect a
    # deployed app), except PYROSCOPE_ADHOC_SERVER_ADDRESS, which wins over everything.
    ENV_MEMBERS = {
      "PYROSCOPE_APPLICATION_NAME" => :application_name,
      "PYROSCOPE_SERVER_ADDRESS" => :server_address,
      "PYROSCOPE_AUTH_TOKEN" => :auth_token,
      "PYROSCOPE_BASIC_AUTH_USER" => :basic_auth_username,
      "PYROSCOPE_BASIC_AUTH_PASSWORD" => :basic_auth_password,
      "PYROSCOPE_TENANT_ID" => :tenant_id,
      "PYROSCOPE_SAMPLE_RATE" => :sample_rate,
      "PYROSCOPE_LOG_LEVEL" => :log_level,
      "PYROSCOPE_ADHOC_SERVER_ADDRESS" => :server_address,
    }.freeze

    LOG_LEVELS = { "trace" => Logger::DEBUG, "debug" => Logger::DEBUG, "info" => Logger::INFO,
                   "warn" => Logger::WARN, "error" => Logger::ERROR }.freeze
    MEANINGLESS = { detect_subprocesses: false, oncpu: true, compression: "gzip", report_encoding: "pprof" }.freeze

    def apply_env(env = ENV)
      ENV_MEMBERS.each do |var, member|
        value = env[var]
        next if value.nil? || value.empty?

        self[member] = member == :sample_rate ? integer_env(var, value) : value
      end
      types = env["PYROSCOPE_PROFILE_TYPES"]
      self.profile_types = types.split(",").map(&:strip).reject(&:empty?) unless types.nil? || types.strip.empty?
      self
    end

    # Raises ArgumentError naming the option, the value and what is accepted.
    def validate!
      name = own_name
      unless name.nil? || name == "" || (name.is_a?(String) && name.match?(Exporter::APP_NAME))
        raise ArgumentError, "application_name must be set and match #{Exporter::APP_NAME.source} " \
                             "(letters, digits, _ . - /), got #{name.inspect}"
      end
      if name.to_s.empty? && !ServiceName.otel_name && !ServiceName.pending?
        raise ArgumentError, "application_name must be set, or come from OpenTelemetry (OTEL_SERVICE_NAME, or " \
                             "the SDK's service.name once configured; the SDK is not loaded), got #{name.inspect}"
      end
      unless sample_rate.is_a?(Integer) && (1..1000).cover?(sample_rate)
        raise ArgumentError, "sample_rate must be an Integer in 1..1000 (Hz), got #{sample_rate.inspect}"
      end
      unless LOG_LEVELS.key?(log_level.to_s)
        raise ArgumentError, "log_level must be one of #{LOG_LEVELS.keys.join(", ")}, got #{log_level.inspect}"
      end
      check_hash(:tags, tags)
      check_hash(:http_headers, http_headers)
      %i[report_pid report_thread_id autoinstrument_rails no_signals].each do |flag|
        raise ArgumentError, "#{flag} must be true or false, got #{self[flag].inspect}" unless [true, false].include?(self[flag])
      end
      unless logger.nil? || %i[add debug info warn error].all? { |m| logger.respond_to?(m) }
        raise ArgumentError, "logger must be a Logger (or respond to add/debug/info/warn/error), got #{logger.class}"
      end
      %i[auth_token basic_auth_username basic_auth_password tenant_id].each { |m| check_header_value(m) }
      raise ArgumentError, "server_address must be a String URL, got #{server_address.inspect}" unless server_address.is_a?(String)
      unless ca_file.nil? || (ca_file.is_a?(String) && File.file?(ca_file) && File.readable?(ca_file))
        raise ArgumentError, "ca_file must be nil (the system's CAs) or a readable PEM file, got #{ca_file.inspect}"
      end

      %i[upload_interval connect_timeout timeout exit_timeout].each { |m| check_number(m, 0.001..86_400) }
      check_integer(:queue_max_windows, 1..100_000)
      check_integer(:queue_max_bytes, 1024..(1 << 40))
      check_integer(:local_max_bytes, 1024..(1 << 50))
      check_integer(:max_depth, 1..4096)
      check_integer(:max_samples, 16..(1 << 24))
      check_profile_types
      self
    end

    # The name profiles go under: own_name when set, else OpenTelemetry's service name
    # (ServiceName); read again each time, as the SDK may be configured later.
    def effective_name
      ServiceName.resolve(own_name)
    end

    # app_name, the old spelling, wins over application_name, as in the `pyroscope` gem.
    def own_name
      app_name.nil? || app_name.to_s.empty? ? application_name : app_name
    end

    def effective_logger
      logger || Logger.new($stderr, level: LOG_LEVELS.fetch(log_level.to_s), progname: "pyroscope")
    end

    # Options that mean nothing in-process, set to something else than their default.
    def meaningless_settings
      MEANINGLESS.reject { |member, default| self[member] == default }.to_h { |member, _| [member, self[member]] }
    end

    private

    # profile_types: an Array of :cpu and :wall (Strings accepted, as from
    # PYROSCOPE_PROFILE_TYPES), :cpu always among them; normalized to Symbols.
    def check_profile_types
      types = profile_types
      unless types.is_a?(Array) && !types.empty?
        raise ArgumentError, "profile_types must be an Array of #{PROFILE_TYPES.inspect}, got #{types.inspect}"
      end
      symbols = types.map do |t|
        sym = (t.is_a?(String) || t.is_a?(Symbol)) && t.to_s.strip.downcase.to_sym
        unless PROFILE_TYPES.include?(sym)
          raise ArgumentError, "profile_types: unknown profile type #{t.inspect} (known: #{PROFILE_TYPES.map(&:inspect).join(", ")})"
        end

        sym
      end.uniq
      unless symbols.include?(:cpu)
        raise ArgumentError, "profile_types must include :cpu (the wall type rides on the CPU samples), got #{types.inspect}"
      end
      if symbols.include?(:wall) && !Native::WALL_SUPPORTED
        raise ArgumentError, "profile_types: :wall needs Ruby >= 3.2 (its GVL hand-over events, which give exact " \
                             "wall time); this is Ruby #{RUBY_VERSION}: use [:cpu]"
      end
      wall = wall_scope.is_a?(String) ? wall_scope.to_sym : wall_scope
      unless WALL_SCOPES.include?(wall)
        raise ArgumentError, "wall_scope must be one of #{WALL_SCOPES.map(&:inspect).join(", ")}, got #{wall_scope.inspect}"
      end
      self.wall_scope = wall
      self.profile_types = symbols
    end

    def integer_env(var, value)
      Integer(value, 10)
    rescue ArgumentError
      raise ArgumentError, "#{var} must be an integer, got #{value.inspect}"
    end

    # Header values: a String (a number is taken as its text) without line breaks or NUL,
    # which would otherwise end up as extra request headers.
    def check_header_value(member)
      value = self[member]
      self[member] = value = value.to_s if value.is_a?(Numeric)
      return if value.is_a?(String) && !value.match?(/[\r\n\0]/)

      raise ArgumentError, "#{member} must be a String without line breaks, got #{value.inspect}"
    end

    def check_number(member, range)
      value = self[member]
      return if value.is_a?(Numeric) && range.cover?(value)

      raise ArgumentError, "#{member} must be a number of seconds in #{range}, got #{value.inspect}"
    end

    def check_integer(member, range)
      value = self[member]
      return if value.is_a?(Integer) && range.cover?(value)

      raise ArgumentError, "#{member} must be an Integer in #{range}, got #{value.inspect}"
    end

    def check_hash(name, value)
      raise ArgumentError, "#{name} must be a Hash, got #{value.inspect}" unless value.is_a?(Hash)

      value.each do |k, v|
        unless k.is_a?(String) || k.is_a?(Symbol)
          raise ArgumentError, "#{name}: keys must be Strings or Symbols, got #{k.inspect}"
        end
        unless [String, Symbol, Integer, Float, TrueClass, FalseClass].any? { |c| v.is_a?(c) }
          raise ArgumentError, "#{name}: value of #{k.inspect} must be a String, Symbol, number or boolean, got #{v.inspect}"
        end
      end
    end
  end
end
