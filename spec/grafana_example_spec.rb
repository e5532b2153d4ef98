# frozen_string_literal: true

require "open3"
require "tmpdir"
require "uri"
require "yaml"

# examples/grafana cannot be started here (no Docker engine), so every file is parsed and
# its wiring checked: images pinned, each URL a service of the compose file on the port that
# service listens on, data source uids, and what Grafana's link depends on, measured on the
# app itself: bin/demo run with the compose file's environment (servers swapped for the
# contract receiver) uploads under its spans' service.name, and its pprof makes the server
# derive the profile type ids the Tempo data sources ask for.
RSpec.describe "examples/grafana" do
  dir = File.expand_path("../examples/grafana", __dir__)
  let(:compose) { YAML.safe_load(File.read(File.join(dir, "docker-compose.yml"))) }
  let(:tempo_config) { YAML.safe_load(File.read(File.join(dir, "tempo.yml"))) }
  let(:datasources) { YAML.safe_load(File.read(File.join(dir, "grafana/provisioning/datasources/datasources.yml")))["datasources"] }
  let(:tempo_dss) { datasources.select { |d| d["type"] == "tempo" } } # CPU, wall time
  let(:pyroscope_ds) { datasources.find { |d| d["type"] == "grafana-pyroscope-datasource" } }
  let(:services) { compose["services"] }
  let(:app_env) { services["app"]["environment"] }

  # The container port a service publishes for `port` ("host:container" mappings).
  def published?(service, port)
    services.fetch(service)["ports"].to_a.any? { |p| p.to_s.split(":").last == port.to_s }
  end

  it "pins every image, in the compose file and the app's Dockerfile" do
    images = services.values.filter_map { |s| s["image"] }
    images << File.read(File.join(dir, "app/Dockerfile"))[/^FROM (\S+)/, 1]
    expect(images.size).to eq(4)
    expect(images).to all(match(/\A[\w.\/-]+:\d+\.\d+\.\d+[\w.-]*\z/))
  end

  it "wires Grafana's data sources to the Tempo and Pyroscope services, on the ports they listen on" do
    expect(URI(pyroscope_ds["url"])).to have_attributes(host: "pyroscope", port: 4040) # Pyroscope's default HTTP port
    expect(published?("pyroscope", 4040)).to be(true)
    tempo_dss.each { |ds| expect(URI(ds["url"])).to have_attributes(host: "tempo", port: tempo_config["server"]["http_listen_port"]) }
    expect(published?("tempo", tempo_config["server"]["http_listen_port"])).to be(true)
    expect(services["grafana"]["volumes"]).to include("./grafana/provisioning:/etc/grafana/provisioning")
    expect(File).to exist(File.join(dir, "grafana/provisioning/datasources/datasources.yml"))
    expect(services["tempo"]["command"]).to eq(["-config.file=/etc/tempo.yml"])
    expect(services["tempo"]["volumes"]).to include("./tempo.yml:/etc/tempo.yml")
  end

  it "sends the app's profiles to the Pyroscope service and its spans to Tempo's OTLP receiver" do
    expect(URI(app_env["PYROSCOPE_SERVER_ADDRESS"])).to have_attributes(host: "pyroscope", port: 4040)
    otlp = URI(app_env["OTEL_EXPORTER_OTLP_ENDPOINT"])
    expect(otlp.host).to eq("tempo")
    expect(tempo_config.dig("distributor", "receivers", "otlp", "protocols", "http", "endpoint")).to eq("0.0.0.0:#{otlp.port}")
    expect(published?("tempo", otlp.port)).to be(true)
    expect(app_env).to include("OTEL_TRACES_EXPORTER" => "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL" => "http/protobuf")
    gemfile = File.read(File.join(dir, "app/Gemfile"))
    expect(gemfile).to include('eval_gemfile File.expand_path("../../../Gemfile", __dir__)', 'gem "opentelemetry-exporter-otlp"')
    expect(app_env["RUBYOPT"]).to eq("-rbundler/setup -ropentelemetry-exporter-otlp")
    build = services["app"]["build"]
    expect(File.expand_path(build["context"], dir)).to eq(File.expand_path("../..", dir))
    expect(File).to exist(File.join(dir, "../..", build["dockerfile"]))
  end

  it "points Tempo's traces-to-profiles at the Pyroscope data source, by uid, mapping service.name to service_name" do
    expect(tempo_dss.size).to eq(2)
    expect(datasources.map { |d| d["uid"] }.uniq.size).to eq(datasources.size)
    tempo_dss.each do |ds|
      link = ds["jsonData"]["tracesToProfiles"]
      expect(link["datasourceUid"]).to eq(pyroscope_ds["uid"])
      expect(link["tags"]).to eq([{ "key" => "service.name", "value" => "service_name" }])
      expect(link["customQuery"]).to be(false)
    end
  end

  it "runs the app as composed: it uploads under its spans' service.name, as the profile type ids Tempo asks for" do
    receiver = ContractReceiver.new
    out_dir = Dir.mktmpdir("grafana-example")
    env = app_env.merge("PYROSCOPE_SERVER_ADDRESS" => receiver.url, "RUBYOPT" => ENV.fetch("RUBYOPT", nil),
                        "OTEL_TRACES_EXPORTER" => "console") # the OTLP exporter is the container's; the spans' resource is printed instead
    out, err, status = Open3.capture3(env, RbConfig.ruby, File.expand_path("../bin/demo", __dir__), "--seconds", "2",
                                      "--out", out_dir)
    expect(status).to be_success, err
    span_service = out[/"service\.name"\s*=>\s*"([^"]+)"/, 1]
    expect(span_service).to eq("rideshare.ruby.demo")
    expect(out).to match(/"pyroscope\.profile\.id"\s*=>\s*"\h{16}"/) # the attribute Grafana's link needs, on the exported spans
    expect(receiver.violations).to be_empty
    expect(receiver.accepted.map { |r| r[:params]["name"] }.uniq).to eq([span_service])
    expect(out).to include("as service_name=#{span_service}")

    # the ids the server derives from the uploads, as the contract receiver does
    # (PprofDecoder.profile_type_ids); wall ones where Ruby has GVL hand-over events (the
    # app's image: 3.4), and only there the wall data source's link finds profiles
    derived = receiver.accepted.flat_map { |r| r[:profile_type_ids] }.uniq.sort
    asked = tempo_dss.map { |ds| ds["jsonData"]["tracesToProfiles"]["profileTypeId"] }
    expect(derived).to eq(Pyroscope::Native::WALL_SUPPORTED ? asked.sort : asked.grep(/\Aprocess_cpu:/))
    expect(receiver.samples.map { |s| s[:labels].keys }.flatten.uniq).to include("profile_id", "span")
  ensure
    receiver&.close
    FileUtils.rm_rf(out_dir) if out_dir
  end
end
