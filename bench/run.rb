# frozen_string_literal: true

# `rake bench`: every benchmark, one after another (never in parallel: they measure CPU),
# then one table, printed and written to BENCHMARKS.md under a heading for this Ruby, with
# the machine and the date. Sections of other Rubies already in the file are kept.
#   ruby -Ilib bench/run.rb          (BENCH_QUICK=1: fewer, shorter runs)
require "json"
require "rbconfig"
require "tempfile"
require "time"

SCRIPTS = %w[sampler_overhead web_overhead request_cost span_processor export_cost memory accuracy attribution].freeze
FILE = File.expand_path("../BENCHMARKS.md", __dir__)
lib = File.expand_path("../lib", __dir__)

rows = SCRIPTS.flat_map do |name|
  Tempfile.create("bench-#{name}") do |json|
    puts "== bench/#{name}.rb"
    ok = system({ "BENCH_JSON" => json.path }, RbConfig.ruby, "-I", lib, File.join(__dir__, "#{name}.rb"))
    abort "bench/#{name}.rb failed" unless ok
    JSON.parse(File.read(json.path), symbolize_names: true)
  end
end

cpu = File.read("/proc/cpuinfo")[/^model name\s*:\s*(.*)$/, 1] rescue "unknown CPU" # rubocop:disable Style/RescueModifier
machine = "#{`uname -sr`.strip}, #{cpu}, #{`nproc`.strip} cores"
verdict = ->(r) { r[:met].nil? ? "" : (r[:met] ? "met" : "**missed**") }
table = ["| benchmark | measure | result | target | |", "|---|---|---|---|---|"]
rows.each { |r| table << "| #{r[:bench]} | #{r[:metric]} | #{r[:value]} | #{r[:target]} | #{verdict.call(r)} |" }
heading = "## Ruby #{RUBY_VERSION}"
section = <<~MD
  #{heading}

  #{machine}; #{Time.now.utc.iso8601}#{ENV["BENCH_QUICK"] == "1" ? "; quick mode (BENCH_QUICK=1)" : ""}.

  #{table.join("\n")}
MD

puts "\n#{section}"
intro = <<~MD
  # Benchmarks

  Written by `rake bench` (bench/run.rb). Every figure comes from runs interleaved in one go
  (A B A B …), reported as median (min–max); ratios are to the unprofiled run. These machines
  are noisy: compare ratios, not absolute times. The scripts' headers say what each measures.
MD
# Sections written by hand (notes: the peers, where the cost goes) come first and are kept.
sections = File.exist?(FILE) ? File.read(FILE).split(/^(?=## )/).drop(1) : []
notes, sections = sections.partition { |s| !s.start_with?("## Ruby ") }
sections.reject! { |s| s.start_with?("#{heading}\n") }
sections << section
File.write(FILE, ([intro] + notes + sections.sort_by { |s| Gem::Version.new(s[/\d+\.\d+\.\d+/]) }).join("\n"))
puts "written to #{FILE}"
