# frozen_string_literal: true

require "open3"
require "tmpdir"
require "rubygems/package"

# The gem as it ships: built from this checkout with `gem build`, installed with plain
# `gem install --local` into an empty GEM_HOME (no Bundler, no checkout on any path), then
# the README's quickstart run verbatim against the contract receiver, and the CLI on the
# profiles it wrote. The extension is really compiled by `gem install`, as on a user's machine.
RSpec.describe "The released gem" do
  root = File.expand_path("..", __dir__)
  gem_command = File.join(RbConfig::CONFIG["bindir"], RbConfig::CONFIG["ruby_install_name"].sub("ruby", "gem"))

  # The .gem files of the gem's runtime dependencies, from the bundle's cache: what
  # `gem install --local` finds in the current directory instead of asking RubyGems.org.
  def self.dependency_gems(name, seen = {})
    Gem.loaded_specs.fetch(name).runtime_dependencies.each do |dep|
      next if seen[dep.name]

      seen[dep.name] = Gem.loaded_specs.fetch(dep.name).cache_file
      dependency_gems(dep.name, seen)
    end
    seen.values
  end

  # The README's quickstart, as written there.
  def self.quickstart(root)
    File.read(File.join(root, "README.md"))[/^## Quickstart.*?^```ruby\n(.*?)^```$/m, 1] or raise "no quickstart in README.md"
  end

  before(:all) do
    @dir = Dir.mktmpdir("pyroscope-gem")
    @gem_home = File.join(@dir, "gem_home")
    @gem_file = File.join(@dir, "pyroscope-otel.gem")
    # only the system's programs: no Bundler, no RUBYOPT, no RUBYLIB, no GEM_PATH of ours
    @env = { "PATH" => "#{@gem_home}/bin:/usr/local/bin:/usr/bin:/bin", "HOME" => @dir, "LANG" => "C.UTF-8",
             "GEM_HOME" => @gem_home, "GEM_PATH" => @gem_home }
    @build = Open3.capture2e(@env, gem_command, "build", "pyroscope-otel.gemspec", "--output", @gem_file, chdir: root,
                                                                                                        unsetenv_others: true)
    FileUtils.cp(self.class.dependency_gems("pyroscope-otel"), @dir)
    @install = Open3.capture2e(@env, gem_command, "install", "--local", "--no-document", @gem_file, chdir: @dir,
                                                                                                    unsetenv_others: true)
  end

  after(:all) { FileUtils.rm_rf(@dir) }

  def run_installed(*args, env: {})
    Open3.capture3(@env.merge(env), *args, chdir: @dir, unsetenv_others: true)
  end

  it "is built with the flame graph assets, the license and the docs, and nothing of the checkout's tooling" do
    expect(@build.last).to be_success, @build.first
    files = Gem::Package.new(@gem_file).spec.files
    expect(files).to include("LICENSE", "README.md", "CHANGELOG.md", "ext/pyroscope_otel/DESIGN.md",
                             "ext/pyroscope_otel/extconf.rb", "exe/pyroscope-otel",
                             "lib/pyroscope/flamegraph/assets/d3-d3.min.js",
                             "lib/pyroscope/flamegraph/assets/d3-flame-graph-d3-flamegraph.min.js")
    expect(files.grep(%r{\A(spec|bench|bin|tmp|vendor|pkg)/})).to be_empty
    expect(files.grep(/\.(so|o)\z/)).to be_empty
    expect(File.read(File.join(root, "LICENSE"))).to include("Apache License", "Version 2.0")
    expect(Gem::Package.new(@gem_file).spec.license).to eq("Apache-2.0")
  end

  it "installs with plain `gem install --local` into an empty GEM_HOME, compiling the extension" do
    expect(@install.last).to be_success, @install.first
    expect(@install.first).to match(/Successfully installed pyroscope-otel-#{Pyroscope::VERSION}/)
    expect(Dir[File.join(@gem_home, "**", "pyroscope", "pyroscope_otel.so")]).not_to be_empty
  end

  it "is required from a process with no project paths: everything it loads is the installed gem's" do
    out, err, status = run_installed(RbConfig.ruby, "-e", <<~RUBY)
      require "pyroscope"
      require "pyroscope/otel"
      puts $LOADED_FEATURES.grep(/pyroscope/)
      puts "bundler" if defined?(Bundler)
    RUBY
    expect(status).to be_success, err
    loaded = out.lines.map(&:chomp)
    expect(loaded).to include(a_string_ending_with("pyroscope/pyroscope_otel.so"))
    expect(loaded).to all(start_with(@gem_home))
    expect(loaded.grep(/#{Regexp.escape(root)}/)).to be_empty
    expect(loaded).not_to include("bundler")
  end

  it "runs the README's quickstart verbatim, its profile reaching the server, and the CLI draws it" do
    File.write(File.join(@dir, "quickstart.rb"), self.class.quickstart(root))
    receiver = ContractReceiver.new
    begin
      _, err, status = run_installed(RbConfig.ruby, "quickstart.rb", env: { "PYROSCOPE_SERVER_ADDRESS" => receiver.url,
                                                                             "OTEL_TRACES_EXPORTER" => "none" })
      expect(status).to be_success, err
      expect(err).to be_empty
      expect(receiver.violations).to be_empty
      expect(receiver.accepted.map { |r| r[:params]["name"] }.uniq).to eq(["rideshare-ruby"])
      bike = receiver.samples.select { |s| s[:labels]["vehicle"] == "bike" }
      expect(bike.flat_map { |s| s[:frames].map(&:first) }).to include("Object#find_nearest_vehicle")
      expect(bike.map { |s| s[:labels]["span"] }.uniq).to eq(["BikeHandler"])
      expect(bike.map { |s| s[:labels]["profile_id"] }.uniq).to all(match(/\A\h{16}\z/))
    ensure
      receiver.close
    end

    profiles = File.join(@dir, "profiles")
    _, err, status = run_installed(RbConfig.ruby, "quickstart.rb", env: { "PYROSCOPE_SERVER_ADDRESS" => "file://#{profiles}",
                                                                           "OTEL_TRACES_EXPORTER" => "none" })
    expect(status).to be_success, err
    out, err, status = run_installed("pyroscope-otel", "spans", profiles)
    expect(status).to be_success, err
    expect(out).to match(/\h{16}\s.*BikeHandler/)
    html = File.join(@dir, "bike.html")
    out, err, status = run_installed("pyroscope-otel", "flamegraph", "--span", "BikeHandler", "-o", html, profiles)
    expect(status).to be_success, err
    expect(out).to include("bike.html")
    expect(File.read(html)).to include("Object#find_nearest_vehicle", "t.flamegraph=n()") # d3-flame-graph, inlined
  end

  it "fails to install with the package to get when a build dependency is missing (libprotobuf-c-dev hidden)" do
    # The compiler's own search path, with /usr/include seen through a copy of symlinks to
    # all of it but protobuf-c/: to this `gem install` the package's headers are not there,
    # as on a machine without it (no root, no mount: it works in the chroot lanes too).
    cc = RbConfig::CONFIG["CC"]
    search = Open3.capture2e("#{cc} -E -Wp,-v -", stdin_data: "").first[/<\.\.\.> search starts here:\n(.*?)End of/m, 1]
    dirs = search.split.map do |d|
      next d unless d == "/usr/include"

      mirror = File.join(@dir, "include")
      FileUtils.mkdir_p(mirror)
      (Dir.children(d) - ["protobuf-c"]).each { |e| File.symlink(File.join(d, e), File.join(mirror, e)) unless File.exist?(File.join(mirror, e)) }
      mirror
    end
    cppflags = (["-nostdinc"] + dirs.flat_map { |d| ["-isystem", d] }).join(" ")
    out, err, status = run_installed(gem_command, "install", "--local", "--no-document", "--install-dir",
                                     File.join(@dir, "other_home"), @gem_file, "--", "--with-cppflags=#{cppflags}")
    expect(status).not_to be_success
    expect(out + err).to include("pyroscope-otel: libprotobuf-c (protobuf-c/protobuf-c.h) was not found")
      .and include("sudo apt-get install libprotobuf-c-dev")
    expect(File).to exist("/usr/include/protobuf-c/protobuf-c.h") # hidden from that install only
  end
end
