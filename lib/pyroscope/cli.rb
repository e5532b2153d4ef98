# frozen_string_literal: true

require "optparse"
require "pyroscope/flamegraph"

module Pyroscope
  # `pyroscope-otel`: flame graphs and span lists from pprof files, offline.
  class CLI
    USAGE = <<~TEXT
      Usage: pyroscope-otel COMMAND [options] PATH...
      PATHs are pprof files (*.pb.gz) or directories of them, e.g. the local target's
      (server_address = "file:///some/dir").

      Commands:
        flamegraph   write a self-contained HTML flame graph (no network needed to view it);
                     --type wall for wall time (profiles taken with profile_types [:cpu, :wall])
        spans        list the span ids and names found, with their CPU (and wall time)
        labels       list the label names and values found, with their CPU
    TEXT

    def initialize(out: $stdout, err: $stderr)
      @out = out
      @err = err
    end

    # Returns the exit status: 0 done, 1 nothing matched, 2 bad usage or input.
    def run(argv)
      command = argv.shift
      case command
      when "flamegraph" then flamegraph(argv)
      when "spans" then spans(argv)
      when "labels" then labels(argv)
      when nil, "-h", "--help", "help" then @out.puts(USAGE) || 0
      else usage_error("unknown command #{command.inspect}")
      end
    rescue OptionParser::ParseError, ArgumentError, Flamegraph::Error => e
      usage_error(e.message)
    end

    private

    def flamegraph(argv)
      opts = { output: "flamegraph.html", labels: {} }
      parser = OptionParser.new do |o|
        o.banner = "Usage: pyroscope-otel flamegraph [options] PATH..."
        o.on("-o", "--output FILE", "where to write the HTML (default: flamegraph.html)") { |v| opts[:output] = v }
        o.on("-l", "--label KEY=VALUE", "only samples with this label (repeatable)") { |v| add_label(opts, v) }
        o.on("--span-id ID", "only this span's samples (profile_id or span_id label)") { |v| opts[:span_id] = v }
        o.on("--span NAME", "only samples of spans with this name (span or span_name label)") { |v| opts[:span] = v }
        o.on("--title TITLE", "the page's title") { |v| opts[:title] = v }
        o.on("-t", "--type TYPE", %w[cpu wall], "cpu (default) or wall: what the widths are") { |v| opts[:type] = v.to_sym }
      end
      paths = parser.parse(argv)
      type = opts[:type] || :cpu
      loaded = load(paths)
      if type == :wall && !loaded.wall?
        raise ArgumentError, "no wall time in #{paths.join(", ")}: profile with profile_types = [:cpu, :wall] (Ruby >= 3.2)"
      end

      graph = select(loaded.of(type), opts)
      return nothing_matched(opts) if graph.total_ns.zero?

      what = type == :wall ? "wall time" : "CPU"
      title = opts[:title] || (type == :wall ? "Wall-clock flame graph" : "CPU flame graph")
      subtitle = "#{format_ms(graph.total_ns)} of #{what} in #{graph.samples.size} samples from #{graph.files.size} " \
                 "file(s)#{describe(opts)}"
      File.write(opts[:output], graph.to_html(title: title, subtitle: subtitle))
      @out.puts "#{opts[:output]}: #{subtitle}"
      0
    end

    def spans(argv)
      paths = OptionParser.new("Usage: pyroscope-otel spans PATH...").parse(argv)
      graph = load(paths)
      found = graph.spans
      return nothing_matched({}) if found.empty?

      total = graph.total_ns.nonzero? || 1
      if graph.wall? # then the wall time of each span too: its duration, where it was in a span throughout
        @out.puts format("%-32s  %-40s  %12s  %7s  %12s  %7s", "span id", "span name", "CPU", "share", "wall", "samples")
        found.each do |s|
          @out.puts format("%-32s  %-40s  %12s  %6.2f%%  %12s  %7d", s.id, s.name.to_s[0, 40], format_ms(s.cpu_ns),
                           100.0 * s.cpu_ns / total, format_ms(s.wall_ns), s.samples)
        end
        return 0
      end
      @out.puts format("%-32s  %-40s  %12s  %7s  %7s", "span id", "span name", "CPU", "share", "samples")
      found.each do |s|
        @out.puts format("%-32s  %-40s  %12s  %6.2f%%  %7d", s.id, s.name.to_s[0, 40], format_ms(s.cpu_ns),
                         100.0 * s.cpu_ns / total, s.samples)
      end
      0
    end

    def labels(argv)
      paths = OptionParser.new("Usage: pyroscope-otel labels PATH...").parse(argv)
      graph = load(paths)
      cpu = Hash.new(0)
      graph.samples.each { |s| s.labels.each { |k, v| cpu[[k, v]] += s.cpu_ns } }
      return nothing_matched({}) if cpu.empty?

      cpu.sort_by { |(k, v), ns| [k, -ns, v] }.each { |(k, v), ns| @out.puts format("%-24s %-40s %12s", k, v, format_ms(ns)) }
      0
    end

    def load(paths)
      raise ArgumentError, "no PATH given (pprof files or directories)" if paths.empty?

      graph = Flamegraph.load(paths)
      raise ArgumentError, "no pprof files in #{paths.join(", ")}" if graph.files.empty?

      graph
    end

    def select(graph, opts)
      graph = graph.filter(opts[:labels])
      graph = graph.select { |s| s.labels.values_at(*Flamegraph::SPAN_ID_LABELS).include?(opts[:span_id]) } if opts[:span_id]
      graph = graph.select { |s| s.labels.values_at(*Flamegraph::SPAN_NAME_LABELS).include?(opts[:span]) } if opts[:span]
      graph
    end

    def add_label(opts, text)
      key, value = text.split("=", 2)
      raise ArgumentError, "--label wants KEY=VALUE, got #{text.inspect}" if key.to_s.empty? || value.nil?

      opts[:labels][key] = value
    end

    def describe(opts)
      filters = opts[:labels].map { |k, v| "#{k}=#{v}" }
      filters << "span id #{opts[:span_id]}" if opts[:span_id]
      filters << "span #{opts[:span]}" if opts[:span]
      filters.empty? ? "" : ", where #{filters.join(", ")}"
    end

    def nothing_matched(opts)
      @err.puts "pyroscope-otel: no samples#{describe(opts.merge(labels: opts[:labels] || {}))}"
      1
    end

    def usage_error(message)
      @err.puts "pyroscope-otel: #{message}"
      @err.puts USAGE
      2
    end

    def format_ms(ns)
      ns >= 10_000_000 ? "#{(ns / 1e6).round} ms" : format("%.2f ms", ns / 1e6)
    end
  end
end
