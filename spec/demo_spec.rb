# frozen_string_literal: true

require "json"
require "open3"
require "tmpdir"

# The README's first command, in a short mode: a real Puma app with the real OTel SDK,
# load from a second process, profiles in the local target, flame graphs at the end.
RSpec.describe "bin/demo" do
  let(:out) { Dir.mktmpdir("pyroscope-demo") }

  after { FileUtils.rm_rf(out) }

  def names_in(html)
    data = JSON.parse(html[/const data = (.*?);\n/, 1])
    names = []
    walk = lambda do |n|
      names << n["name"]
      n["children"].each(&walk)
    end
    walk.call(data)
    names
  end

  it "profiles the app into the local target and writes flame graphs overall and per route" do
    demo = File.expand_path("../bin/demo", __dir__)
    env = { "PYROSCOPE_SERVER_ADDRESS" => nil, "PYROSCOPE_ADHOC_SERVER_ADDRESS" => nil }
    stdout, stderr, status = Open3.capture3(env, RbConfig.ruby, demo, "--seconds", "3", "--out", out)
    expect(status).to be_success, stderr
    expect(stdout).to match(%r{\d+ s / 3 s +\d+ requests})
    expect(stdout).to include("PYROSCOPE_SERVER_ADDRESS=http://localhost:4040 bin/demo")
    graphs = %w[flamegraph flamegraph-bikes flamegraph-scooters flamegraph-cars].map { |n| File.join(out, "#{n}.html") }
    graphs.each { |g| expect(stdout).to include(g) }
    expect(Dir[File.join(out, "profiles", "*.pb.gz")]).not_to be_empty
    { "bikes" => "Rideshare.find_nearest_bike", "cars" => "Rideshare.find_nearest_car",
      "scooters" => "Rideshare.find_nearest_scooter" }.each do |route, method|
      names = names_in(File.read(File.join(out, "flamegraph-#{route}.html")))
      expect(names).to include(method)
      expect(names.grep(/find_nearest_/).uniq).to eq([method])
    end
    expect(names_in(File.read(graphs.first)).grep(/find_nearest_/).uniq.size).to eq(3)
    trips = File.join(out, "flamegraph-trips-wall.html")
    if Pyroscope::Native::WALL_SUPPORTED # the waiting route's wall time: where it waited, beside its CPU
      expect(stdout).to include(trips)
      names = names_in(File.read(trips))
      expect(names).to include("Rideshare.pricing_quote", "IO#gets", "Rideshare.load_trip_history")
      expect(names.grep(/\AKernel[#.]sleep\z/)).not_to be_empty
    else
      expect(File.exist?(trips)).to be(false)
    end
  end
end
