# frozen_string_literal: true

require "json"
require "pyroscope/native"

module Pyroscope
  # Profiles read back from pprof files (the local target's, or any CPU pprof), filtered
  # by labels and rendered as a self-contained HTML flame graph with d3-flame-graph, of
  # CPU or (profiles with profile type :wall) of wall time.
  class Flamegraph
    ASSETS = File.join(__dir__, "flamegraph", "assets")
    SCRIPTS = %w[d3-d3.min.js d3-flame-graph-d3-flamegraph.min.js d3-flame-graph-d3-flamegraph-tooltip.min.js].freeze
    STYLE = "d3-flame-graph-d3-flamegraph.css"
    SPAN_ID_LABELS = %w[profile_id span_id].freeze
    SPAN_NAME_LABELS = %w[span span_name].freeze
    PROFILE_FILES = "*.{pb.gz,pprof,pb,pprof.gz}"

    # frames leaf first, each [name, file, line]; wall_ns 0 in profiles without the wall type
    Sample = Struct.new(:frames, :labels, :cpu_ns, :wall_ns)
    Span = Struct.new(:id, :name, :cpu_ns, :samples, :wall_ns)
    TYPES = %i[cpu wall].freeze

    attr_reader :samples, :files, :type

    # Reads files and directories (their *.pb.gz, *.pprof files). Raises ArgumentError
    # naming a path that is missing or not a profile.
    def self.load(paths)
      files = paths.flat_map do |path|
        next Dir.glob(File.join(path, PROFILE_FILES)).sort if File.directory?(path)
        raise ArgumentError, "no such file or directory: #{path}" unless File.exist?(path)

        [path]
      end
      samples = files.flat_map { |file| read(file) }
      new(samples, files)
    end

    def self.read(file)
      profile = Native.read_pprof(File.binread(file))
      wall = profile[:sample_types].index(%w[wall nanoseconds])
      cpu = profile[:sample_types].index(%w[cpu nanoseconds]) || (wall ? nil : 0) # a foreign CPU profile: its first type
      profile[:samples].map do |frames, labels, values|
        Sample.new(frames, labels, cpu ? values[cpu].to_i : 0, wall ? values[wall].to_i : 0)
      end
    rescue ArgumentError => e
      raise ArgumentError, "#{file}: #{e.message}"
    end

    # type: which value the graph and its totals are of, :cpu or :wall.
    def initialize(samples, files = [], type: :cpu)
      raise ArgumentError, "type must be one of #{TYPES.join(", ")}, got #{type.inspect}" unless TYPES.include?(type)

      @samples = samples
      @files = files
      @type = type
    end

    # Only the samples that carry every given label (String => String).
    def filter(labels)
      return self if labels.empty?

      select { |s| labels.all? { |k, v| s.labels[k] == v } }
    end

    # The samples the block accepts, as a graph of the same type.
    def select(&block)
      self.class.new(@samples.select(&block), @files, type: @type)
    end

    # The same samples, graphed by another value.
    def of(type)
      self.class.new(@samples, @files, type: type)
    end

    def value(sample)
      @type == :wall ? sample.wall_ns : sample.cpu_ns
    end

    def total_ns
      @samples.sum { |s| value(s) }
    end

    def wall?
      @samples.any? { |s| s.wall_ns.positive? }
    end

    # The spans found, by span id (profile_id or span_id) and name (span or span_name),
    # most CPU first.
    def spans
      found = {}
      @samples.each do |s|
        id = s.labels.values_at(*SPAN_ID_LABELS).compact.first
        next unless id

        name = s.labels.values_at(*SPAN_NAME_LABELS).compact.first
        span = (found[[id, name]] ||= Span.new(id, name, 0, 0, 0))
        span.cpu_ns += s.cpu_ns
        span.wall_ns += s.wall_ns
        span.samples += 1
      end
      found.values.sort_by { |span| [@type == :wall ? -span.wall_ns : -span.cpu_ns, span.id] }
    end

    # The call tree, root first: nodes { name:, file:, line:, value: (ns of the graph's
    # type, inclusive), children: [] }, frames merged by function name and file; `line` is
    # the line with the most of it under it.
    def tree
      root = node("all", "")
      @samples.each do |s|
        ns = value(s)
        next unless ns.positive?

        root[:value] += ns
        at = root
        s.frames.reverse_each do |name, file, line|
          at = (at[:kids][[name, file]] ||= node(name, file))
          at[:value] += ns
          at[:lines][line] += ns
        end
      end
      finish(root)
    end

    def to_html(title:, subtitle: "")
      assets = SCRIPTS + [STYLE]
      missing = assets.reject { |a| File.exist?(File.join(ASSETS, a)) }
      unless missing.empty?
        raise Error, "flame graph assets missing from #{ASSETS} (#{missing.join(", ")}): the released gem ships them, " \
                     "so reinstall it; in a git checkout, run `bin/setup` or `rake assets`"
      end

      data = JSON.generate(tree).gsub("</", "<\\/")
      scripts = SCRIPTS.map { |a| "<script>#{File.read(File.join(ASSETS, a)).gsub("</script", "<\\/script")}</script>" }
      format(TEMPLATE, title: escape(title), subtitle: escape(subtitle), style: File.read(File.join(ASSETS, STYLE)),
                       scripts: scripts.join("\n"), data: data, what: @type == :wall ? "wall" : "CPU")
    end

    class Error < StandardError; end

    private

    def node(name, file)
      { name: name, file: file, value: 0, lines: Hash.new(0), kids: {} }
    end

    def finish(n)
      line = n[:lines].max_by { |_, ns| ns }&.first
      children = n[:kids].values.map { |k| finish(k) }.sort_by { |k| -k[:value] }
      { name: n[:name], file: n[:file], line: line, value: n[:value], children: children }
    end

    def escape(text)
      text.to_s.gsub("&", "&amp;").gsub("<", "&lt;").gsub(">", "&gt;").gsub('"', "&quot;")
    end

    TEMPLATE = <<~HTML
      <!DOCTYPE html>
      <html lang="en">
      <head>
      <meta charset="utf-8">
      <title>%<title>s</title>
      <style>
      %<style>s
      body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0; color: #222; }
      header { padding: 14px 24px 6px; }
      h1 { font-size: 20px; margin: 0 0 4px; }
      .sub { color: #555; font-size: 13px; margin: 0; }
      #controls { padding: 6px 24px; font-size: 13px; }
      #controls input { width: 260px; }
      #chart { margin: 0 24px; }
      #details { padding: 6px 24px 16px; font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12px;
                 color: #333; min-height: 1.4em; }
      .d3-flame-graph-tip { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12px; max-width: 640px; }
      .d3-flame-graph-tip .file { color: #bbb; }
      </style>
      %<scripts>s
      </head>
      <body>
      <header><h1>%<title>s</h1><p class="sub">%<subtitle>s</p></header>
      <div id="controls">
        <form id="search"><input id="term" type="search" placeholder="highlight frames matching a regexp">
        <button type="submit">Search</button> <button type="button" id="reset">Reset zoom</button></form>
      </div>
      <div id="chart"></div>
      <div id="details">Hover a frame for its file and line; click it to zoom.</div>
      <script>
      const data = %<data>s;
      const total = data.value || 1;
      const ms = ns => (ns / 1e6).toLocaleString(undefined, { maximumFractionDigits: ns < 1e7 ? 2 : 0 }) + " ms";
      const pct = ns => (100 * ns / total).toFixed(2) + "%%";
      const esc = s => String(s).replace(/[&<>"]/g, c => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" }[c]));
      const where = d => d.data.file ? d.data.file + (d.data.line ? ":" + d.data.line : "") : "";
      const text = d => d.data.name + "  " + ms(d.value) + " %<what>s, " + pct(d.value) + (where(d) ? "  " + where(d) : "");
      const tip = flamegraph.tooltip.defaultFlamegraphTooltip().html(d =>
        "<b>" + esc(d.data.name) + "</b><br><span class=\\"file\\">" + esc(where(d)) + "</span><br>" +
        ms(d.value) + " %<what>s, " + pct(d.value) + " of the total");
      const chartEl = document.getElementById("chart");
      const chart = flamegraph().width(chartEl.clientWidth).cellHeight(18).minFrameSize(1).sort(true)
        .transitionDuration(250).label(text).tooltip(tip).setDetailsElement(document.getElementById("details"));
      d3.select(chartEl).datum(data).call(chart);
      document.getElementById("search").addEventListener("submit", e => {
        e.preventDefault();
        const term = document.getElementById("term").value;
        term ? chart.search(term) : chart.clear();
      });
      document.getElementById("reset").addEventListener("click", () => chart.resetZoom());
      </script>
      </body>
      </html>
    HTML
  end
end
