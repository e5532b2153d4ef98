# frozen_string_literal: true

require "logger"
require "tmpdir"

# server_address = "file:///dir": the same windows as uploads, as gzipped pprof files,
# read back here with the independent decoder.
RSpec.describe "The local target" do
  let(:dir) { Dir.mktmpdir("pyroscope-local") }
  let(:work) { Workload.new }

  after do
    Pyroscope.shutdown
    FileUtils.rm_rf(dir)
  end

  def configure(**members) = configure_pyroscope("local/app", "file://#{dir}/profiles", tags: { "region" => "test" }, **members)

  def files = Dir[File.join(dir, "profiles", "*.pb.gz")].sort

  it "writes each window as a gzipped pprof file with its labels and global tags" do
    lost_before = Pyroscope.stats.values_at(:windows_failed, :windows_dropped)
    configure
    Pyroscope.tag_wrapper({ "vehicle" => "bike" }) { work.find_nearest_bike(0.2) }
    Pyroscope.shutdown
    expect(files).not_to be_empty # one, or two when the run crossed a 10 s window boundary
    files.each { |f| expect(File.basename(f)).to match(/\Alocal_app-\d{8}T\d{6}Z-#{Process.pid}\.pb\.gz\z/) }
    samples = files.flat_map { |f| PprofDecoder.samples(PprofDecoder.decode(PprofDecoder.gunzip(File.binread(f)))) }
    bike = samples.select { |s| s[:labels]["vehicle"] == "bike" }
    expect(bike.sum { |s| s[:cpu_ns] }).to be_within(40_000_000).of(200_000_000)
    expect(bike.flat_map { |s| s[:frames].map(&:first) }).to include("Workload#find_nearest_bike")
    expect(samples.map { |s| s[:labels]["region"] }.uniq).to eq(["test"])
    expect(Pyroscope.stats.values_at(:windows_failed, :windows_dropped)).to eq(lost_before)
  end

  it "keeps the directory under local_max_bytes, removing the oldest files first" do
    configure(upload_interval: 0.2, local_max_bytes: 2_000)
    # the pauses inside the tag: an untagged pause could leave a last window whose only
    # sample has no "i", and a single file fits under the cap
    12.times { |i| Pyroscope.tag_wrapper({ "i" => i.to_s }) { work.heavy(0.05); sleep(0.2) } }
    Pyroscope.shutdown
    expect(files.sum { |f| File.size(f) }).to be <= 2_000
    kept = files.flat_map do |f|
      PprofDecoder.samples(PprofDecoder.decode(PprofDecoder.gunzip(File.binread(f)))).map { |s| s[:labels]["i"] }
    end.compact.map(&:to_i)
    expect(kept).not_to be_empty
    expect(kept.max).to eq(11)      # the newest window is there
    expect(kept.min).to be > 0      # the oldest went first
  end

  it "rejects a file URL that is not a local absolute directory, naming server_address" do
    expect { configure(server_address: "file://otherhost/x") }.to raise_error(ArgumentError, /server_address/)
    expect { configure(server_address: "file:///proc/no/such/dir") }.to raise_error(ArgumentError, /server_address/)
  end
end
