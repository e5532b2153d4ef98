# frozen_string_literal: true

require "pyroscope/otel"
require "logger"

# The span processor with the real opentelemetry-sdk: labels, attributes, fibers, short
# spans, and span profiles end to end through the contract receiver.
RSpec.describe Pyroscope::Otel::SpanProcessor do
  let(:native) { Pyroscope::Native }
  let(:work) { Workload.new }
  let(:spans) { OpenTelemetry::SDK::Trace::Export::InMemorySpanExporter.new }
  let(:processor) { described_class.new("spec.app.cpu", "http://pyroscope.example:4040") }
  let(:provider) do
    OpenTelemetry::SDK::Trace::TracerProvider.new.tap do |p|
      p.add_span_processor(processor)
      p.add_span_processor(OpenTelemetry::SDK::Trace::Export::SimpleSpanProcessor.new(spans))
    end
  end
  let(:tracer) { provider.tracer("spec") }
  let(:errors) { [] }

  around do |example|
    handler = OpenTelemetry.error_handler
    OpenTelemetry.error_handler = ->(exception: nil, message: nil) { errors << [exception, message] }
    example.run
  ensure
    OpenTelemetry.error_handler = handler
  end

  def labels = native.labels
  def span_labels(id, name) = { "profile_id" => id, "span" => name }
  def finished(name) = spans.finished_spans.find { |s| s.name == name }

  describe "the upstream API" do
    it "has the upstream constants, constructor and accessors with their defaults" do
      expect(Pyroscope::Otel::VERSION).to eq(Pyroscope::VERSION)
      expect(Pyroscope::Otel::Error.ancestors).to include(StandardError)
      expect(processor.app_name).to eq("spec.app.cpu")
      expect(processor.pyroscope_endpoint).to eq(URI("http://pyroscope.example:4040"))
      expect([processor.root_span_only, processor.add_span_name, processor.add_url]).to eq([true, true, true])
      expect(processor.force_flush).to eq(OpenTelemetry::SDK::Trace::Export::SUCCESS)
      expect(processor.force_flush(timeout: 1)).to eq(OpenTelemetry::SDK::Trace::Export::SUCCESS)
      expect(processor.shutdown(timeout: 1)).to eq(OpenTelemetry::SDK::Trace::Export::SUCCESS)
    end

    it "takes app_name and endpoint from Pyroscope.current_config when built without them" do
      bare = described_class.new # before configure: read when used
      configure_pyroscope("configured.app", "http://127.0.0.1:9")
      expect(bare.app_name).to eq("configured.app.cpu")
      expect(bare.pyroscope_endpoint).to eq(URI("http://127.0.0.1:9"))
    ensure
      Pyroscope.stop
    end

    it "rejects a bad endpoint, app name or label name, naming it" do
      expect { described_class.new("a", "ftp://x") }.to raise_error(ArgumentError, /pyroscope_endpoint .*"ftp:\/\/x"/)
      expect { described_class.new("a", "not a url") }.to raise_error(ArgumentError, /pyroscope_endpoint/)
      expect { described_class.new("a", 4040) }.to raise_error(ArgumentError, /pyroscope_endpoint .*4040/)
      expect { described_class.new(:app, "http://x") }.to raise_error(ArgumentError, /app_name .*:app/)
      expect { described_class.new("a", "http://x", span_id_label: "span id") }
        .to raise_error(ArgumentError, /span_id_label .*"span id"/)
    end
  end

  describe "#on_start and #on_finish" do
    it "labels a root span's samples and sets the profile id and url attributes as upstream" do
      id = nil
      tracer.in_span("BikeHandler") do |span|
        id = span.context.hex_span_id
        expect(labels).to eq(span_labels(id, "BikeHandler"))
      end
      expect(labels).to eq({})
      attrs = finished("BikeHandler").attributes
      expect(attrs["pyroscope.profile.id"]).to eq(id)
      url = URI(attrs["pyroscope.profile.url"])
      expect([url.scheme, url.host, url.port]).to eq(["http", "pyroscope.example", 4040])
      query = URI.decode_www_form(url.query).to_h
      expect(query["query"]).to eq(%(spec.app.cpu{profile_id="#{id}"}))
      expect(query["until"].to_i - query["from"].to_i).to eq(3600)
      expect(query["from"].to_i).to be_within(5).of(Time.now.to_i)
    end

    it "labels only local roots by default: a child keeps its root's labels, a remote parent makes a root" do
      tracer.in_span("root") do |root|
        tracer.in_span("child") { expect(labels).to eq(span_labels(root.context.hex_span_id, "root")) }
      end
      expect(finished("child").attributes).not_to include("pyroscope.profile.id")

      remote = OpenTelemetry::Trace::SpanContext.new(trace_id: Random.bytes(16), span_id: Random.bytes(8), remote: true,
                                                     trace_flags: OpenTelemetry::Trace::TraceFlags::SAMPLED)
      parent = OpenTelemetry::Trace.context_with_span(OpenTelemetry::Trace.non_recording_span(remote))
      span = tracer.start_span("from-remote", with_parent: parent)
      expect(labels).to eq(span_labels(span.context.hex_span_id, "from-remote"))
      span.finish
      expect(finished("from-remote").attributes).to include("pyroscope.profile.id")
    end

    it "with root_span_only = false, an inner span's labels replace the outer's until it ends" do
      processor.root_span_only = false
      tracer.in_span("outer") do |outer|
        outer_labels = span_labels(outer.context.hex_span_id, "outer")
        expect(labels).to eq(outer_labels)
        tracer.in_span("inner") { |inner| expect(labels).to eq(span_labels(inner.context.hex_span_id, "inner")) }
        expect(labels).to eq(outer_labels)
      end
      expect(labels).to eq({})
    end

    it "when an outer span ends first, the inner one's labels stay until it ends" do
      processor.root_span_only = false
      outer = tracer.start_span("outer")
      inner = OpenTelemetry::Context.with_current(OpenTelemetry::Trace.context_with_span(outer)) { tracer.start_span("inner") }
      outer.finish
      expect(labels).to eq(span_labels(inner.context.hex_span_id, "inner"))
      inner.finish
      expect(labels).to eq({})
    end

    it "offers span_id/span_name label names and a trace_id label" do
      p = described_class.new("a.cpu", "http://x:4040", span_id_label: "span_id", span_name_label: "span_name",
                                                        add_trace_id: true)
      t = OpenTelemetry::SDK::Trace::TracerProvider.new.tap { |pr| pr.add_span_processor(p) }.tracer("t")
      t.in_span("GET /cars") do |span|
        expect(labels).to eq("span_id" => span.context.hex_span_id, "span_name" => "GET /cars",
                             "trace_id" => span.context.hex_trace_id)
      end
      expect(labels).to eq({})
    end

    it "keeps the user's tags around the span labels and removes only its own" do
      Pyroscope.tag_wrapper({ "vehicle" => "bike" }) do
        tracer.in_span("BikeHandler") do |span|
          expect(labels).to eq(span_labels(span.context.hex_span_id, "BikeHandler").merge("vehicle" => "bike"))
        end
        expect(labels).to eq("vehicle" => "bike")
      end
    end

    it "removes exactly what it set when the span was renamed while running" do
      tracer.in_span("before") { |span| span.name = "after" }
      expect(labels).to eq({})
    end

    it "removes the labels from the starting fiber when the span finishes on another thread" do
      span = tracer.start_span("handed-over")
      expect(labels).to include("span" => "handed-over")
      Thread.new { span.finish }.join
      expect(labels).to eq({})
    end

    it "removes the labels from the starting fiber when the span finishes in another fiber" do
      span = nil
      starter = Fiber.new do
        span = tracer.start_span("fiber-span")
        Fiber.yield labels
        labels
      end
      expect(starter.resume).to include("span" => "fiber-span")
      expect(labels).to eq({}) # the root fiber never had them
      Fiber.new { span.finish }.resume
      expect(starter.resume).to eq({}) # gone when the starting fiber runs again
      expect(errors).to be_empty
    end

    it "never raises into the application: errors go to OpenTelemetry.handle_error" do
      expect { processor.on_start(Object.new, OpenTelemetry::Context.empty) }.not_to raise_error
      expect { processor.on_finish(Object.new) }.not_to raise_error
      expect(errors.size).to eq(1) # on_finish of an unlabelled object is a no-op
      expect(errors.first[1]).to match(/pyroscope-otel/)
      expect(errors.first[0]).to be_a(NoMethodError)
    end
  end

  describe "fiber-aware labels" do
    # Burns 4 ms slices of CPU inside a span, pausing (switching fibers) after each.
    # Returns [measured CPU s, hex span id].
    def span_in_slices(name, method, pause, slices: 40)
      cpu = 0.0
      tracer.in_span(name) do |span|
        slices.times do
          before = thread_cpu
          work.public_send(method, 0.004)
          cpu += thread_cpu - before
          pause.call
        end
        [cpu, span.context.hex_span_id]
      end
    end

    def check_apart(measured)
      samples = take_samples
      by_span = samples.group_by { |_, l, *| l["span"] }
      expect(by_span.keys.compact).to contain_exactly("one", "two")
      { "one" => "worker_two", "two" => "worker_one" }.each do |span, other|
        expect(by_span[span].none? { |frames, *| on_stack?(frames, other) }).to be(true), "#{span} has #{other}"
        expect(by_span[span].map { |_, l, *| l["profile_id"] }.uniq).to eq([measured[span][1]])
        profiled = by_span[span].sum { |_, _, cpu, _| cpu } / 1e9
        expect(profiled).to be_within(0.15 * measured[span][0]).of(measured[span][0])
      end
    end

    it "gives two fibers interleaving their own spans on one thread only their own samples" do
      native.start(sample_rate: 200)
      measured = {}
      pause = -> { Fiber.yield }
      one = Fiber.new { measured["one"] = span_in_slices("one", :worker_one, pause) }
      two = Fiber.new { measured["two"] = span_in_slices("two", :worker_two, pause) }
      [one, two].each { |f| f.resume if f.alive? } while one.alive? || two.alive?
      native.stop
      check_apart(measured)
    end

    it "does the same under a fiber scheduler (async)" do
      require "async"
      native.start(sample_rate: 200)
      measured = {}
      Async do |task|
        pause = -> { task.yield }
        [task.async { measured["one"] = span_in_slices("one", :worker_one, pause) },
         task.async { measured["two"] = span_in_slices("two", :worker_two, pause) }].each(&:wait)
      end
      native.stop
      check_apart(measured)
    end
  end

  it "gives >= 95 % of 1 000 spans of 1-3 ms their CPU at 100 Hz, within 10 %, never on own frames" do
    native.start(sample_rate: 100)
    measured = {}
    1000.times do |i|
      tracer.in_span("short") do |span|
        before = thread_cpu
        work.light(0.001 + (i % 21) * 0.0001)
        measured[span.context.hex_span_id] = thread_cpu - before
      end
    end
    native.stop
    samples = take_samples
    profiled = cpu_by(samples) { |_, l| l["profile_id"] }
    with_cpu = measured.count { |id, _| profiled[id].positive? }
    close = measured.count { |id, cpu| (profiled[id] / 1e9 - cpu).abs <= 0.1 * cpu }
    expect(with_cpu).to be >= 950
    expect(close).to be >= 950
    own = [File.expand_path("../lib", __dir__), *Pyroscope::Otel.opentelemetry_paths]
    boundary_leaves = samples.select { |_, l, _, count| count.zero? && l["profile_id"] }.map { |frames, *| frames.first }
    expect(boundary_leaves).not_to be_empty
    expect(boundary_leaves.map { |_, file, _| file }.uniq.select { |f| own.any? { |o| f.start_with?(o) } }).to eq([])
  end

  describe "span profiles end to end" do
    let(:receiver) { ContractReceiver.new }

    after do
      Pyroscope.shutdown
      receiver.close
    end

    def configure = configure_pyroscope("rideshare.ruby", receiver.url)

    def handle(vehicle, seconds = 0.1)
      name = "#{vehicle.capitalize}Handler"
      Pyroscope.tag_wrapper({ "vehicle" => vehicle }) do
        tracer.in_span(name) { work.public_send(:"find_nearest_#{vehicle}", seconds) }
      end
    end

    it "keeps each handler's samples under its own span, and each span's profile id on its samples" do
      configure
      3.times { %w[bike scooter car].each { |v| handle(v) } }
      Pyroscope.shutdown
      receiver.wait_for(1)
      expect(receiver.violations).to be_empty
      by_span = receiver.samples.group_by { |s| s[:labels]["span"] }
      methods = %w[bike scooter car].to_h { |v| ["#{v.capitalize}Handler", "Workload#find_nearest_#{v}"] }
      methods.each do |span, method|
        names = by_span.fetch(span).flat_map { |s| s[:frames].map(&:first) }.uniq
        expect(names).to include(method)
        expect(names & (methods.values - [method])).to be_empty
        expect(by_span[span].map { |s| s[:labels]["vehicle"] }.uniq).to eq([span.delete_suffix("Handler").downcase])
      end
      spans.finished_spans.each do |span|
        mine = receiver.samples.select { |s| s[:labels]["profile_id"] == span.attributes["pyroscope.profile.id"] }
        expect(mine).not_to be_empty
        expect(mine.map { |s| s[:labels]["span"] }.uniq).to eq([span.name])
      end
    end

    it "keeps every span's samples apart in a 10-thread server-style run" do
      configure
      threads = 10.times.map do |i|
        Thread.new do
          30.times { |k| handle(%w[bike scooter car][(i + k) % 3], 0.01) }
        end
      end
      threads.each(&:join)
      Pyroscope.shutdown
      receiver.wait_for(1)
      expect(spans.finished_spans.size).to eq(300)
      span_names = spans.finished_spans.to_h { |s| [s.attributes["pyroscope.profile.id"], s.name] }
      labelled = receiver.samples.select { |s| s[:labels]["profile_id"] }
      expect(labelled.map { |s| s[:labels]["profile_id"] }.uniq.size).to be >= 290
      labelled.each do |s|
        expect(span_names[s[:labels]["profile_id"]]).to eq(s[:labels]["span"])
        s[:frames].map(&:first).grep(/find_nearest_/).each do |method|
          expect(method).to eq("Workload#find_nearest_#{s[:labels]["vehicle"]}")
        end
      end
    end
  end
end
