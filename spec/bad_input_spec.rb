# frozen_string_literal: true

require "logger"

# Every configuration option given a wrong type or value, and labels of every odd kind:
# a clear error naming the option and value, or a documented conversion; the process,
# and profiling as it was, go on.
RSpec.describe "Bad input" do
  let(:native) { Pyroscope::Native }

  after { Pyroscope.shutdown }

  def configure(**members) = configure_pyroscope("bad.input", "http://127.0.0.1:9", **members)

  WRONG = {
    application_name: [42, "has space", "{x}"], # nil or "": from OpenTelemetry (service_name_spec)
    app_name: [42, "a,b"],
    server_address: [42, "ftp://x", "not a url", "file://host/dir"],
    auth_token: [:sym, "a\nX-Evil: 1"],
    basic_auth_username: [[], "u\r\n"],
    basic_auth_password: [{}, "p\0"],
    tenant_id: [Object.new, "t\n"],
    sample_rate: [0, 1001, "100", 1.5, nil],
    report_pid: ["yes", 1, nil],
    report_thread_id: ["no"],
    log_level: ["loud", 3],
    tags: ["a=b", { 1 => "x" }, { "k" => Object.new }],
    autoinstrument_rails: ["true"],
    http_headers: ["X: y", { "Bad Name" => "v" }, { "X-Ok" => "line\nbreak" }],
    logger: [$stderr, "log"],
    upload_interval: [0, -1, "10", nil],
    connect_timeout: [0, "5"],
    timeout: [-3, nil],
    queue_max_windows: [0, 1.5, "12"],
    queue_max_bytes: [1, "64M"],
    exit_timeout: [0, "5"],
    local_max_bytes: [0, "1G"],
    max_depth: [0, 5000, "512"],
    max_samples: [1, 1 << 30, 1.0],
    ca_file: ["/nonexistent/ca.pem", "/tmp", 1],
  }.freeze

  it "rejects a wrong type or value for every option, naming it, and starts nothing" do
    WRONG.each do |member, values|
      values.each do |value|
        expect { configure(member => value) }.to raise_error(ArgumentError, /#{member == :app_name ? "application_name" : member}/),
                                                  "#{member} = #{value.inspect}"
        expect(native).not_to be_running
      end
    end
  end

  it "keeps the running profiler as it was when a reconfigure is refused" do
    configure
    expect(native).to be_running
    config = Pyroscope.current_config
    expect { configure(max_samples: 3) }.to raise_error(ArgumentError, /max_samples/)
    expect(native).to be_running
    expect(Pyroscope.current_config).to equal(config)
  end

  it "converts numbers in credentials to text, as documented" do
    configure(tenant_id: 42)
    expect(Pyroscope.current_config.tenant_id).to eq("42")
  end

  it "takes labels of every odd kind: a clear error or a documented conversion" do
    native.set_labels({ key: :sym, "n" => 1, "f" => 1.5, "t" => true, "gone" => nil })
    expect(native.labels).to eq("key" => "sym", "n" => "1", "f" => "1.5", "t" => "true")
    binary = (+"\xFF\xFEbin").force_encoding(Encoding::BINARY)
    native.set_labels({ "bin" => binary, "huge" => "é" * 5000, "k" * 3000 => "v" })
    got = native.labels
    expect(got["bin"].b).to eq(binary)
    expect(got["huge"].bytesize).to eq(2048) # cut at a character boundary
    expect(got.keys.map(&:bytesize).max).to eq(1024)
    expect { native.set_labels({ "x" => Object.new }) }.to raise_error(TypeError, /"x"/)
    expect { native.set_labels({ 42 => "x" }) }.to raise_error(TypeError, /label key/)
    expect { native.set_labels({ "" => "x" }) }.to raise_error(ArgumentError, /empty/)
    expect { native.set_labels("a=b") }.to raise_error(TypeError)
    expect(native.labels).to eq(got) # a refused change leaves the labels as they were
  end

  it "refuses 10 000 labels on one thread with the server's limit, and goes on" do
    many = Array.new(10_000) { |i| ["k#{i}", i] }.to_h
    expect { native.set_labels(many) }.to raise_error(ArgumentError, /at most 100/)
    expect { Pyroscope.tag_wrapper(many) { raise "not reached" } }.to raise_error(ArgumentError, /at most 100/)
    sixty = ->(prefix) { Array.new(60) { |i| ["#{prefix}#{i}", i] }.to_h }
    native.set_labels(sixty.call("a"))
    expect { Pyroscope.tag_wrapper(sixty.call("b")) { raise "not reached" } }.to raise_error(ArgumentError, /120 .*at most 100/)
    expect(native.labels.size).to eq(60) # 120 once merged: refused, the tags as they were
    go = Queue.new
    other = Thread.new { go.pop }
    Thread.pass until other.native_thread_id
    expect(native.change_thread_tags(other, sixty.call("a"))).to be_a(Hash)
    expect { native.change_thread_tags(other, sixty.call("b")) }.to raise_error(ArgumentError, /120 .*at most 100/)
    go << true
    other.join
    native.set_labels({ "still" => "fine" })
    expect(native.labels).to eq("still" => "fine")
  end

  it "ignores tags for a thread that has died" do
    dead = Thread.new { Pyroscope.thread_id }.tap(&:join)
    expect { Pyroscope._add_tags(dead.value, { "late" => "x" }) }.not_to raise_error
    expect(native.set_thread_labels(Thread.new {}.tap(&:join), { "late" => "x" })).to be(false)
  end
end
