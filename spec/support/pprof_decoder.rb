# frozen_string_literal: true

require "google/protobuf"
require "google/protobuf/descriptor_pb"
require "stringio"
require "tmpdir"
require "zlib"

# Decodes pprof with the google-protobuf gem and protoc's reading of profile.proto: shares
# no code with the C encoder under test.
module PprofDecoder
  PROTO = File.expand_path("../../ext/pyroscope_otel/proto/profile.proto", __dir__)

  LOCK = Mutex.new # receiver threads decode concurrently; the pool takes the file once

  module_function

  def profile_class
    LOCK.synchronize { @profile_class ||= load_profile_class }
  end

  def load_profile_class
    out = File.join(Dir.mktmpdir("pprof-desc"), "profile.desc")
    system("protoc", "--proto_path=#{File.dirname(PROTO)}", "--descriptor_set_out=#{out}", File.basename(PROTO),
           exception: true)
    pool = Google::Protobuf::DescriptorPool.generated_pool # message classes need this pool
    Google::Protobuf::FileDescriptorSet.decode(File.binread(out)).file.each do |file|
      pool.add_serialized_file(Google::Protobuf::FileDescriptorProto.encode(file))
      # as generated code does: every message class made up front, or repeated fields
      # of message type cannot be read
      file.message_type.each { |m| pool.lookup("#{file.package}.#{m.name}").msgclass }
    end
    pool.lookup("perftools.profiles.Profile").msgclass
  end

  def decode(raw)
    profile_class.decode(raw)
  end

  def gunzip(gz)
    Zlib::GzipReader.new(StringIO.new(gz)).read
  end

  # [{ frames: [[name, file, line], ...] leaf first, labels: {}, cpu_ns:, wall_ns: }]: the
  # values of the cpu and wall sample types (0 for a type the profile does not have)
  def samples(profile)
    st = profile.string_table
    types = profile.sample_type.map { |t| st[t.type] }
    cpu = types.index("cpu")
    wall = types.index("wall")
    functions = profile.function.to_h { |f| [f.id, f] }
    locations = profile.location.to_h { |l| [l.id, l] }
    profile.sample.map do |s|
      frames = s.location_id.map do |id|
        line = locations.fetch(id).line.first
        fn = functions.fetch(line.function_id)
        [st[fn.name], st[fn.filename], line.line]
      end
      { frames: frames, labels: s.label.to_h { |l| [st[l.key], st[l.str]] },
        cpu_ns: cpu ? s.value[cpu] : 0, wall_ns: wall ? s.value[wall] : 0 }
    end
  end

  # The profile type ids Pyroscope derives from a profile pushed to /ingest, per sample
  # type (grafana/pyroscope: pkg/og/convert/pprof/profile.go RawProfile.metricName names
  # the whole profile "wall" when any sample type is "wall", else "process_cpu" for a
  # type containing "cpu"; pkg/phlaredb/labels/labels.go joins
  # name:type:unit:period type:period unit).
  def profile_type_ids(profile)
    st = profile.string_table
    types = profile.sample_type.map { |t| [st[t.type], st[t.unit]] }
    name = types.any? { |t, _| t == "wall" } ? "wall" : (types.any? { |t, _| t.include?("cpu") } ? "process_cpu" : types.last&.first)
    period = [st[profile.period_type.type], st[profile.period_type.unit]]
    types.map { |t, u| [name, t, u, *period].join(":") }
  end
end
