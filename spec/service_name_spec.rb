# frozen_string_literal: true

require "json"

# Grafana links a span to its profiles by the span's service.name (as service_name): without
# an application_name, profiles go under OpenTelemetry's service name. Each example is a
# child Ruby (its own environment, SDK and warnings) uploading to the contract receiver.
RSpec.describe "The service name" do
  let(:receiver) { ContractReceiver.new }

  after { receiver.close }

  # Runs `body` after Pyroscope.configure (with `members`) in a child; returns its stdout,
  # stderr and the names its uploads went under.
  def child(body, members: "", env: {}, sdk: true)
    code = <<~RUBY
      require "pyroscope"
      #{sdk ? 'require "pyroscope/otel"' : ""}
      Pyroscope.configure do |c|
        c.server_address = #{receiver.url.inspect}
        c.upload_interval = 0.3
        #{members}
      end
      def burn(s) = (t = Process.clock_gettime(Process::CLOCK_THREAD_CPUTIME_ID) + s; nil while Process.clock_gettime(Process::CLOCK_THREAD_CPUTIME_ID) < t)
      #{body}
      Pyroscope.shutdown
    RUBY
    out, err, status = run_ruby(code, env: { "OTEL_SERVICE_NAME" => nil, "OTEL_RESOURCE_ATTRIBUTES" => nil,
                                             "OTEL_TRACES_EXPORTER" => "none" }.merge(env))
    expect(status).to be_success, err
    [out, err, receiver.accepted.map { |r| r[:params]["name"] }.uniq]
  end

  it "is OTEL_SERVICE_NAME when application_name is not set" do
    _, err, names = child("burn(0.1)", env: { "OTEL_SERVICE_NAME" => "env.svc" }, sdk: false)
    expect(names).to eq(["env.svc"])
    expect(err).to be_empty
  end

  it "is the SDK's service.name once configured, also after Pyroscope.configure, and the bare span processor follows it" do
    out, err, names = child(<<~RUBY)
      OpenTelemetry::SDK.configure do |c|
        c.service_name = "sdk.svc"
        c.add_span_processor(Pyroscope::Otel::SpanProcessor.new)
      end
      span = OpenTelemetry.tracer_provider.tracer("t").in_span("Handler") { |s| burn(0.1); s }
      require "json"
      require "json"
      puts JSON.generate(span.attributes)
    RUBY
    expect(names).to eq(["sdk.svc"])
    expect(err).to be_empty
    attributes = JSON.parse(out.lines.last)
    expect(URI.decode_www_form(URI(attributes["pyroscope.profile.url"]).query).to_h["query"])
      .to eq(%(sdk.svc.cpu{profile_id="#{attributes["pyroscope.profile.id"]}"}))
    span_samples = receiver.samples.select { |s| s[:labels]["profile_id"] == attributes["pyroscope.profile.id"] }
    expect(span_samples).not_to be_empty
  end

  it "is OpenTelemetry's unknown_service while the SDK is loaded but not yet configured" do
    _, _, names = child("burn(0.05)")
    expect(names).to eq(["unknown_service"])
  end

  it "warns once, naming the query Grafana then needs, when application_name and service.name differ" do
    _, err, names = child(<<~RUBY, members: 'c.application_name = "own.app"')
      OpenTelemetry::SDK.configure { |c| c.service_name = "sdk.svc" }
      4.times { burn(0.05); sleep 0.3 }
    RUBY
    expect(names).to eq(["own.app"])
    expect(receiver.accepted.size).to be >= 2 # the name was resolved for several windows
    expect(err.scan("pyroscope: application_name").size).to eq(1), err
    expect(err).to include(%(application_name "own.app" is not the OpenTelemetry service.name "sdk.svc"))
      .and include(%(customQuery: true, query: 'service_name="own.app"'))
  end

  it "says nothing when both are set and equal" do
    _, err, names = child(<<~RUBY, members: 'c.application_name = "same.svc"')
      OpenTelemetry::SDK.configure { |c| c.service_name = "same.svc" }
      burn(0.05)
    RUBY
    expect(names).to eq(["same.svc"])
    expect(err).to be_empty
  end

  it "is required when OpenTelemetry cannot give one" do
    _, err, status = run_ruby(<<~RUBY, env: { "OTEL_SERVICE_NAME" => nil })
      require "pyroscope"
      Pyroscope.configure { |c| c.server_address = #{receiver.url.inspect} }
    RUBY
    expect(status).not_to be_success
    expect(err).to match(/ArgumentError/).and match(/application_name must be set, or come from OpenTelemetry \(OTEL_SERVICE_NAME/)
  end
end
