# frozen_string_literal: true

# The sampling core's files call one way (ext/pyroscope_otel/DESIGN.md, "Layers"): read from
# the sources, every file's calls to functions and uses of globals defined in another file
# form a graph with no cycle, and the layers of DESIGN.md are never called upward.
RSpec.describe "The native extension's layers" do
  dir = File.expand_path("../ext/pyroscope_otel", __dir__)
  sources = Dir[File.join(dir, "*.c")].reject { |f| File.basename(f).start_with?("profile.pb-c") }
  code = sources.to_h { |f| [File.basename(f), File.read(f).gsub(%r{/\*.*?\*/}m, "")] }
  defined_in = {}
  code.each do |file, text|
    text.scan(/^[A-Za-z_][\w \*]*?\b(po_\w+)\s*\([^;{]*?\)\s*\{/m) { |(name)| defined_in[name] = file }
    text.scan(/^(?:volatile )?[A-Za-z_][\w \*]*?\b(po_\w+)(?:\[\w*\])?\s*[=;]/) { |(name)| defined_in[name] ||= file }
  end
  calls = code.to_h do |file, text|
    used = text.scan(/\bpo_\w+\b/).uniq.filter_map { |name| defined_in[name] }
    [file, (used - [file]).uniq]
  end

  it "finds each file's definitions (the reader of this spec works)" do
    expect(defined_in).to include("po_sample_from_handler" => "account.c", "po_agg_record" => "aggregate.c",
                                  "po_threads" => "thread_state.c", "po_start" => "profiler.c")
    expect(calls["signal.c"]).to include("account.c")
  end

  it "has no cycle between files" do
    reaches = lambda do |from, to, seen = {}|
      calls.fetch(from, []).any? { |n| n == to || (!seen[n] && (seen[n] = true) && reaches.call(n, to, seen)) }
    end
    cycles = calls.flat_map { |file, callees| callees.select { |c| reaches.call(c, file) }.map { |c| "#{file} ⇄ #{c}" } }
    expect(cycles).to eq([])
  end

  it "never calls a layer above" do
    layers = File.read(File.join(dir, "DESIGN.md"))[/## Layers.*?```\n(.*?)```/m, 1].lines.map { |l| l.scan(/[\w.]+\.c\b/) }
    rank = layers.each_with_index.flat_map { |files, i| files.map { |f| [f, i] } }.to_h
    upward = calls.flat_map do |file, callees|
      callees.select { |c| rank[file] && rank[c] && rank[c] < rank[file] }.map { |c| "#{file} → #{c}" }
    end
    expect(rank.keys).to include("account.c", "thread_state.c", "recorder.c", "signal.c")
    expect(upward).to eq([])
  end
end
