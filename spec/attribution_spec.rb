# frozen_string_literal: true

require "pyroscope/otel"
require "zlib"

# Issue 12's goals of truthful attribution, against the thread CPU clock: a short span's
# CPU shows the code that burnt it, not the frame where the span ended, and CPU burnt
# without the GVL shows the call that burnt it. Statistical: seconds of CPU at 100 Hz, with
# goals a noisy 2-core VM keeps; each failure message gives every figure and its truth.
RSpec.describe "Attribution against the thread CPU clock" do
  let(:native) { Pyroscope::Native }

  it "shows a fast API's short spans in their own code, with their exact CPU" do
    api = FastApi.new
    native.start(sample_rate: 100)
    api.run(threads: 2, cpu_seconds: 3.0, seed: RSpec.configuration.seed)
    native.stop
    fig = api.figures(take_samples)
    report = api.report(fig)

    aggregate_failures do
      FastApi::ROUTES.each_key do |route|
        expect(fig[:own_method][route]).to be >= 0.90, "#{route}: span CPU under find_nearest_#{route}\n#{report}"
        expect(fig[:total_error][route].abs).to be <= 0.10, "#{route}: span CPU total\n#{report}"
      end
      expect(fig[:request_leaf]).to be <= 0.03, "span CPU on the request frame as leaf\n#{report}"
      expect(fig[:spans_with_cpu]).to be >= 0.99, "spans with CPU\n#{report}"
    end
  end

  it "walks the boundary of a kind no sample saw once, not at every change, and keeps its CPU" do
    native.start(sample_rate: 1) # no timer sample lands in these spans: every tail is a boundary charge
    before = native.stats
    cpu = thread_cpu
    300.times do |i|
      token = native.push_span("profile_id", format("%016x", i + 1), "span", "tiny")
      burn(0.0002)
      native.pop_span(token)
    end
    cpu = thread_cpu - cpu
    after = native.stats
    native.stop
    samples = take_samples
    expect(after[:samples] - before[:samples]).to eq(0)
    expect(after[:boundary_flushes] - before[:boundary_flushes]).to be >= 300
    expect(after[:boundary_walks] - before[:boundary_walks]).to be <= 3 # the span kind's, the gaps'
    tiny = samples.select { |_, labels, *| labels["span"] == "tiny" }
    expect(tiny.map { |_, labels, *| labels["profile_id"] }.uniq.size).to eq(300)
    expect(tiny.map(&:first).uniq.size).to eq(1)
    expect(tiny.first.first.map { |_name, file, _line| file }).to include(__FILE__)
    expect(samples.sum { |s| s[2] } / 1e9).to be_within(0.02).of(cpu)
  end

  # On Ruby 3.1 no hook says when a thread releases the GVL: where the CPU it burns without
  # it goes is documented (DESIGN.md), not exact; only its total holds there.
  it "charges CPU burnt without the GVL to the call that burnt it (Ruby >= 3.2; 3.1: its total only)" do
    work = Workload.new
    text = Array.new(150_000) { |i| "#{i},#{i * 7919 % 10_007},rideshare\n" }.join # 3 MB: ~6 ms to inflate here
    blob = Zlib::Deflate.deflate(text)
    buffer = String.new(capacity: text.bytesize)
    inflate_cpu = 0.0
    skipped = native.stats[:skipped_off_gvl]

    native.start(sample_rate: 100)
    native.set_labels({ "loop" => "nogvl" })
    started = thread_cpu
    # 12 s: at 6 s the share's spread run to run (82-91 % against 85 % on 3.3) broke the
    # 5-point goal in one CI run of ~20; at 12 s, 84-88 % in 8 runs
    while thread_cpu - started < 12.0
      before = thread_cpu
      work.inflate_blob(blob, buffer)
      inflate_cpu += (inflated = thread_cpu - before)
      work.light(inflated * 15 / 85) # Ruby work: 15 % of the loop's CPU
    end
    total = thread_cpu - started
    native.clear_labels
    native.stop

    loop_samples = take_samples.select { |_, labels, *| labels["loop"] }
    cpu = cpu_by(loop_samples) { |frames, _| on_stack?(frames, "inflate_blob") }
    profiled = cpu.values.sum / 1e9
    share = cpu[true] / 1e9 / profiled
    true_share = inflate_cpu / total
    skipped = native.stats[:skipped_off_gvl] - skipped
    report = format("inflate: %<s>.1f %% of profiled CPU, %<t>.1f %% measured; profiled %<p>.3f s of %<c>.3f s; " \
                    "%<k>d timer samples skipped off the GVL", s: share * 100, t: true_share * 100, p: profiled, c: total, k: skipped)

    expect(profiled).to be_within(0.05 * total).of(total), report
    expect(share).to be_within(0.05).of(true_share), report if RUBY_VERSION >= "3.2"
  end
end
