# frozen_string_literal: true

# The Rack app of bench/web_server.rb (served by Puma) and bench/request_cost.rb (called
# in-process): a root OpenTelemetry span per request of ~0.7 ms CPU (WEB_WORK times that),
# profiled per mode:
#   none       the OTel SDK only
#   loaded     the OTel SDK, this gem and its processor loaded, not used (what loading costs:
#              its long-lived objects make a small heap collect more often)
#   profiled   this gem (local target) + its span processor + `tag_wrapper` per request
#   wall       as profiled, with profile_types [:cpu, :wall] (Ruby >= 3.2)
#   processor  this gem's span processor only, not sampling
#   sampler    this gem sampling + `tag_wrapper`, no span processor
#   grafana    Grafana's `pyroscope` 1.x + `pyroscope-otel` 0.2 + `tag_wrapper` (run without
#              this gem's lib/ on the load path: both own the name `pyroscope`)
#   datadog    dd-trace-rb's profiler at its defaults, tracing off (DD_* from the caller)
require "logger"
require "opentelemetry/sdk"

module WebApp
  MODES = %w[none loaded profiled wall processor sampler grafana datadog].freeze
  TAGS = { "route" => "rides" }.freeze
  WORK = Integer(ENV.fetch("WEB_WORK", "1"))

  module_function

  def handle(seed)
    Array.new(WORK) do
      rows = Array.new(60) { |i| Array.new(20) { |j| ((i * 31) + (j * seed)) % 101 } }
      rows.map(&:sort).flatten.each_slice(7).sum(&:max)
    end.sum.to_s
  end

  # dir: this gem's local target; sink: the URL Grafana's gem uploads to
  def build(mode, dir, sink, sample_rate: 100, upload_interval: 10)
    abort "mode: #{MODES.join(", ")}" unless MODES.include?(mode)
    ENV["OTEL_TRACES_EXPORTER"] = "none"
    if %w[loaded profiled wall processor sampler grafana].include?(mode)
      require "pyroscope"
      require "pyroscope/otel"
    end
    case mode
    when "profiled", "wall", "sampler"
      Pyroscope.configure do |c|
        c.application_name = "bench.web"
        c.server_address = "file://#{dir}"
        c.logger = Logger.new(nil)
        c.sample_rate = sample_rate
        c.upload_interval = upload_interval
        c.profile_types = %i[cpu wall] if mode == "wall"
      end
    when "grafana"
      Pyroscope.configure do |c|
        c.application_name = "bench.web"
        c.server_address = sink
        c.sample_rate = sample_rate
      end
    when "datadog" then require "datadog/profiling/preload"
    end
    OpenTelemetry::SDK.configure do |c|
      c.service_name = "bench.web"
      c.logger = Logger.new(nil)
      if %w[profiled wall processor grafana].include?(mode)
        c.add_span_processor(Pyroscope::Otel::SpanProcessor.new("bench.web.cpu", "http://localhost:4040"))
      end
    end
    tracer = OpenTelemetry.tracer_provider.tracer("bench")
    respond = ->(env) { [200, { "content-type" => "text/plain" }, [handle(env["QUERY_STRING"].to_i)]] }
    tagged = %w[profiled wall sampler grafana].include?(mode)
    lambda do |env|
      tracer.in_span("GET #{env["PATH_INFO"]}", kind: :server) do
        tagged ? Pyroscope.tag_wrapper(TAGS) { respond.call(env) } : respond.call(env)
      end
    end
  end
end
