# frozen_string_literal: true

require "logger"

# Pyroscope.stats, the self-metrics the README's troubleshooting reads: each counter against
# what really happened (the contract receiver's requests, the labels set, a full window).
RSpec.describe "Pyroscope.stats" do
  let(:receiver) { ContractReceiver.new }
  let(:work) { Workload.new }

  after do
    Pyroscope.shutdown
    receiver.close
  end

  def configure(**members) = configure_pyroscope("stats.app", receiver.url, connect_timeout: 1, timeout: 2, **members)

  # the CPU figures are nil before profiling first started in this process (first example to run)
  def delta(before, after) = Pyroscope::Stats::KEYS.to_h { |k| [k, [after[k], before[k]].all?(Integer) ? after[k] - before[k] : after[k]] }

  it "has exactly the documented keys" do
    expect(Pyroscope.stats.keys).to eq(Pyroscope::Stats::KEYS)
  end

  it "counts samples, label changes, windows and bytes sent, and the profiler's own share of the CPU", :aggregate_failures do
    before = Pyroscope.stats
    configure
    10.times { |i| Pyroscope.tag_wrapper({ "round" => i.to_s }) { work.heavy(0.03) } }
    Pyroscope.shutdown
    after = Pyroscope.stats
    d = delta(before, after)
    expect(d[:running]).to be(false)
    expect(d[:samples]).to be >= 10 # 300 ms at 100 Hz, ~85 % of it effective
    expect(d[:label_changes]).to be >= 20 # each tag_wrapper sets and restores
    expect(d[:windows_sent]).to eq(receiver.accepted.size)
    expect(d[:bytes_sent]).to eq(receiver.accepted.sum { |r| Integer(r[:headers]["content-length"]) })
    expect(d.values_at(:windows_failed, :windows_dropped, :samples_dropped)).to eq([0, 0, 0])
    expect(after[:profiler_cpu_ns]).to be_positive
    expect(after[:process_cpu_ns]).to be > after[:profiler_cpu_ns]
    expect(after[:profiler_cpu_share]).to eq(after[:profiler_cpu_ns].fdiv(after[:process_cpu_ns]))
    # this example's own share: the figures count from the process's first start, and examples
    # run before this one may have stressed the exporter (7.4 % with seed 19031)
    expect(d[:profiler_cpu_ns].fdiv(d[:process_cpu_ns])).to be_between(0.0, 0.05)
  end

  it "counts a window the server refuses as failed, with the last error" do
    receiver.mode = [:status, 400]
    before = Pyroscope.stats
    configure
    work.heavy(0.05)
    Pyroscope.shutdown
    after = Pyroscope.stats
    expect(after[:windows_failed] - before[:windows_failed]).to eq(receiver.requests.size).and be >= 1
    expect(after[:windows_sent]).to eq(before[:windows_sent])
    expect(after[:last_error]).to include("#{receiver.url}/ingest").and include("400")
  end

  it "counts the samples a full window refuses" do
    before = Pyroscope.stats[:samples_dropped]
    configure(max_samples: 16, sample_rate: 1000)
    40.times { |i| Pyroscope.tag_wrapper({ "i" => i.to_s }) { work.heavy(0.003) } }
    Pyroscope.shutdown
    expect(Pyroscope.stats[:samples_dropped] - before).to be >= 20
  end
end
