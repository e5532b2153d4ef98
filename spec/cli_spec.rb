# frozen_string_literal: true

require "json"
require "open3"
require "stringio"
require "tmpdir"
require "pyroscope/cli"

# The command-line tool on a profile whose contents are known exactly.
RSpec.describe Pyroscope::CLI do
  let(:dir) { Dir.mktmpdir("pyroscope-cli") }
  let(:out) { StringIO.new }
  let(:err) { StringIO.new }
  let(:exe) { File.expand_path("../exe/pyroscope-otel", __dir__) }

  after { FileUtils.rm_rf(dir) }

  def frames(*names) = names.map { |n| [n, "#{Dir.pwd}/app/#{n.downcase.tr("#", "_")}.rb", 7] }
  def ms(n) = n * 1_000_000

  # 30 ms under span a (BikeHandler), 10 ms under b (CarHandler), 5 ms unlabelled
  before do
    now = Process.clock_gettime(Process::CLOCK_REALTIME, :nanosecond)
    window = {
      samples: [
        [frames("Bike#nearest", "Handler#call", "main"), { "profile_id" => "aaaaaaaaaaaaaaaa", "span" => "BikeHandler" }, ms(20), 2],
        [frames("Bike#distance", "Handler#call", "main"), { "profile_id" => "aaaaaaaaaaaaaaaa", "span" => "BikeHandler" }, ms(10), 1],
        [frames("Car#nearest", "Handler#call", "main"), { "profile_id" => "bbbbbbbbbbbbbbbb", "span" => "CarHandler" }, ms(10), 1],
        [frames("Idle#tick", "main"), {}, ms(5), 1],
      ],
      started_at_ns: now - 1_000_000_000, ended_at_ns: now, dropped_samples: 0, dropped_cpu_ns: 0,
    }
    Pyroscope::Native._encode(window, [100, Dir.pwd, [], nil]).each_with_index do |gz, i|
      File.binwrite(File.join(dir, "app-#{i}.pb.gz"), gz)
    end
  end

  def run(*args)
    described_class.new(out: out, err: err).run(args)
  end

  # the tree embedded in the page: { name => [value, { child name => ... }] }
  def tree_of(html)
    data = JSON.parse(html[/const data = (.*?);\n/, 1])
    walk = ->(n) { [n["value"], n["children"].to_h { |c| [c["name"], walk.call(c)] }] }
    walk.call(data)
  end

  it "lists the spans found with their CPU, most first" do
    expect(run("spans", dir)).to eq(0)
    rows = out.string.lines.drop(1).map(&:split)
    expect(rows.map { |r| r.first(2) }).to eq([%w[aaaaaaaaaaaaaaaa BikeHandler], %w[bbbbbbbbbbbbbbbb CarHandler]])
    expect(rows.map { |r| r[2] }).to eq(%w[30 10])
    expect(rows.first[4]).to eq("66.67%")
  end

  it "writes a self-contained flame graph whose widths are the CPU of each frame" do
    html_path = File.join(dir, "all.html")
    expect(run("flamegraph", "-o", html_path, dir)).to eq(0)
    html = File.read(html_path)
    expect(html).not_to match(%r{<script[^>]+src=|<link[^>]+href=|https?://cdn}) # nothing fetched
    expect(html).to include("d3-flame-graph").and include("flamegraph()")
    total, children = tree_of(html)
    expect(total).to eq(ms(45))
    main_total, main_children = children.fetch("main")
    expect(main_total).to eq(ms(45))
    handler_total, handler_children = main_children.fetch("Handler#call")
    expect(handler_total).to eq(ms(40))
    expect(handler_children.transform_values(&:first)).to eq("Bike#nearest" => ms(20), "Bike#distance" => ms(10),
                                                             "Car#nearest" => ms(10))
    data = JSON.parse(html[/const data = (.*?);\n/, 1])
    bike = data["children"][0]["children"][0]["children"].find { |c| c["name"] == "Bike#nearest" }
    expect([bike["file"], bike["line"]]).to eq(["app/bike_nearest.rb", 7]) # file:line for the tooltip
  end

  it "filters by span id, span name or any label" do
    path = File.join(dir, "f.html")
    expect(run("flamegraph", "--span-id", "aaaaaaaaaaaaaaaa", "-o", path, dir)).to eq(0)
    expect(tree_of(File.read(path)).first).to eq(ms(30))
    expect(run("flamegraph", "--span", "CarHandler", "-o", path, dir)).to eq(0)
    expect(tree_of(File.read(path)).first).to eq(ms(10))
    expect(run("flamegraph", "-l", "span=BikeHandler", "-o", path, dir)).to eq(0)
    expect(tree_of(File.read(path))[1].dig("main", 1, "Handler#call", 1).keys).to contain_exactly("Bike#nearest",
                                                                                                  "Bike#distance")
    expect(run("flamegraph", "--span", "NoSuchHandler", "-o", path, dir)).to eq(1)
    expect(err.string).to include("no samples")
  end

  it "names bad input and exits 2" do
    expect(run("flamegraph", "-l", "novalue", dir)).to eq(2)
    expect(err.string).to include("--label wants KEY=VALUE")
    expect(run("spans", File.join(dir, "missing"))).to eq(2)
    expect(err.string).to include("no such file or directory")
    File.binwrite(File.join(dir, "junk.pb.gz"), "\x1f\x8bnot gzip")
    expect(run("spans", dir)).to eq(2)
    expect(err.string).to include("junk.pb.gz")
    expect(run("frobnicate")).to eq(2)
  end

  it "runs as the gem's executable" do
    stdout, stderr, status = Open3.capture3(RbConfig.ruby, exe, "spans", dir)
    expect(status).to be_success, stderr
    expect(stdout).to include("BikeHandler").and include("CarHandler")
  end
end
