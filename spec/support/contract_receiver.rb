# frozen_string_literal: true

require "socket"
require "uri"
require "json"
require "openssl"
require_relative "pprof_decoder"

# A stand-in Pyroscope server on 127.0.0.1 that holds every request to the contract of
# SPEC §2.1 (POST <base>/ingest, its query, headers, auth, gzip, a pprof within the server's
# limits) and answers as the real server would, or with a fault:
#   mode = :ok | [:status, code] | [:retry_after, seconds] | [:retry_after_date, http_date]
#          | [:stall, seconds] | [:stall_body, seconds] (after half the body) | :cut
#          | [:trickle, bytes, seconds] (reads the body `bytes` at a time, a pause between)
#          or a lambda giving one of the modes after the body for each request
#   refuse! / accept! close and reopen the port (connection refused meanwhile).
#   tls: an OpenSSL::SSL::SSLContext: https (see TestCA); handshake_delay: seconds before
#   each TLS handshake is answered.
# Each answered request is in `requests` ({params:, headers:, profile:, samples:, status:,
# at: CLOCK_MONOTONIC when its request line arrived}); contract violations are in
# `violations` and answered with 400.
class ContractReceiver
  LABEL_NAME = /\A[A-Za-z0-9_.]+\z/
  APP_NAME = %r{\A[A-Za-z0-9_.\-/]+\z}

  attr_reader :requests, :violations, :port
  attr_accessor :mode, :expect_auth, :expect_tenant, :base_path, :handshake_delay

  def initialize(base_path: "", tls: nil, receive_buffer: nil)
    @base_path = base_path
    @tls = tls
    @handshake_delay = 0
    @mode = :ok
    @requests = []
    @violations = []
    @lock = Mutex.new
    @arrived = ConditionVariable.new
    @server = TCPServer.new("127.0.0.1", 0)
    # accepted connections inherit it: a small one makes a slow reader slow the sender at once
    @server.setsockopt(Socket::SOL_SOCKET, Socket::SO_RCVBUF, receive_buffer) if receive_buffer
    @port = @server.addr[1]
    @threads = []
    start_accepting
  end

  def url
    "#{@tls ? "https" : "http"}://127.0.0.1:#{@port}#{@base_path}"
  end

  def refuse!
    @server.close
    @acceptor.join
  end

  def accept!
    @server = TCPServer.new("127.0.0.1", @port)
    start_accepting
  end

  def close
    @server.close unless @server.closed?
    @acceptor&.join
    @threads.each { |t| t.kill.join(1) }
  end

  # Waits until `count` requests were answered 2xx; returns them.
  def wait_for(count, timeout: 20)
    deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + timeout
    @lock.synchronize do
      while accepted.size < count
        left = deadline - Process.clock_gettime(Process::CLOCK_MONOTONIC)
        raise "only #{accepted.size} of #{count} profiles arrived; violations: #{@violations}" if left <= 0

        @arrived.wait(@lock, left)
      end
      accepted
    end
  end

  def accepted
    @requests.select { |r| r[:status] == 200 }
  end

  def samples
    accepted.flat_map { |r| r[:samples] }
  end

  # The requests answered so far, forgotten here (a long run keeps only its tallies).
  def take_requests
    @lock.synchronize { @requests.slice!(0..) }
  end

  private

  def start_accepting
    server = @server
    @acceptor = Thread.new do
      loop do
        client = server.accept
        @threads << Thread.new(client) { |c| serve(c) }
      rescue IOError, Errno::EBADF
        break
      end
    end
  end

  def serve(client)
    client = secure(client) if @tls
    request_line = client.gets or return
    arrived = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    method, target, = request_line.split(" ", 3)
    headers = {}
    while (line = client.gets) && line != "\r\n"
      name, value = line.split(":", 2)
      headers[name.strip.downcase] = value.strip
    end
    body = read_body(client, Integer(headers.fetch("content-length", "0")))
    respond(client, method, target, headers, body, arrived)
  rescue IOError, SystemCallError, OpenSSL::SSL::SSLError
    nil
  ensure
    client.close unless client.closed?
  end

  def secure(client)
    sleep @handshake_delay
    ssl = OpenSSL::SSL::SSLSocket.new(client, @tls)
    ssl.sync_close = true
    ssl.accept
  end

  def read_body(client, length)
    case @mode
    in [:stall_body, seconds]
      half = client.read(length / 2) or raise EOFError
      sleep seconds
      half + (client.read(length - half.bytesize) or raise EOFError)
    in [:trickle, bytes, seconds]
      body = +""
      while body.bytesize < length
        body << (client.read([bytes, length - body.bytesize].min) or raise EOFError) # a client gone mid-body
        sleep seconds
      end
      body
    else client.read(length)
    end
  end

  def respond(client, method, target, headers, body, arrived)
    mode = @mode.respond_to?(:call) ? @mode.call : @mode
    case mode
    in [:stall, seconds] then sleep seconds
    in :cut
      client.write("HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"partial\"")
      return
    else nil
    end
    record = check(method, target, headers, body)
    status = record[:problems].empty? ? 200 : 400
    extra = ""
    case mode
    in [:status, code] then status = code
    in [:retry_after, seconds] then status = 429
                                    extra = "Retry-After: #{seconds}\r\n"
    in [:retry_after_date, date] then status = 503
                                      extra = "Retry-After: #{date}\r\n"
    else nil
    end
    record[:status] = status
    record[:at] = arrived
    reply = status == 200 ? "" : JSON.generate(code: status, message: record[:problems].join("; "))
    # recorded before answering: once the client has its answer, the record is there
    @lock.synchronize do
      @violations.concat(record[:problems])
      @requests << record
      @arrived.broadcast
    end
    client.write("HTTP/1.1 #{status} X\r\nContent-Type: application/json\r\n#{extra}" \
                 "Content-Length: #{reply.bytesize}\r\nConnection: close\r\n\r\n#{reply}")
  end

  def check(method, target, headers, body)
    problems = []
    uri = URI.parse(target)
    params = URI.decode_www_form(uri.query.to_s).to_h
    problems << "method #{method}" unless method == "POST"
    problems << "path #{uri.path}" unless uri.path == "#{@base_path}/ingest"
    problems << "name #{params["name"].inspect}" unless params["name"].to_s.match?(APP_NAME)
    problems << "from/until #{params.values_at("from", "until")}" unless
      params["from"].to_s.match?(/\A\d+\z/) && params["until"].to_s.match?(/\A\d+\z/) &&
      Integer(params["until"]) > Integer(params["from"]) && (Integer(params["from"]) - Time.now.to_i).abs < 3600
    problems << "format #{params["format"]}" unless params["format"] == "pprof"
    problems << "sampleRate #{params["sampleRate"]}" unless params["sampleRate"].to_s.match?(/\A\d+\z/)
    problems << "spyName missing" if params["spyName"].to_s.empty?
    problems << "content-type #{headers["content-type"]}" unless headers["content-type"] == "binary/octet-stream"
    problems << "content-encoding #{headers["content-encoding"]}" unless headers["content-encoding"] == "gzip"
    problems << "user-agent #{headers["user-agent"]}" unless headers["user-agent"].to_s.start_with?("pyroscope-otel/")
    problems << "authorization #{headers["authorization"].inspect}" unless headers["authorization"] == @expect_auth
    problems << "tenant #{headers["x-scope-orgid"].inspect}" unless headers["x-scope-orgid"] == @expect_tenant
    record = { params: params, headers: headers, problems: problems, samples: [] }
    raw = PprofDecoder.gunzip(body)
    problems << "profile of #{raw.bytesize} bytes" if raw.bytesize > 4 << 20
    profile = PprofDecoder.decode(raw)
    record[:profile] = profile
    check_profile(profile, params, problems)
    record[:samples] = PprofDecoder.samples(profile)
    record[:profile_type_ids] = PprofDecoder.profile_type_ids(profile)
    record
  rescue StandardError => e
    problems << "undecodable body: #{e.class}: #{e.message}"
    { params: params || {}, headers: headers, problems: problems, samples: [] }
  end

  def check_profile(profile, params, problems)
    st = profile.string_table
    problems << "string_table[0] #{st[0].inspect}" unless st[0] == ""
    types = profile.sample_type.map { |t| [st[t.type], st[t.unit]] }
    # a CPU profile, or (profile type :wall) a wall one beside it: never both in one, as the
    # server would name the CPU type after the wall one (PprofDecoder.profile_type_ids)
    problems << "sample_type #{types}" unless [[%w[cpu nanoseconds]], [%w[wall nanoseconds]]].include?(types)
    period = [st[profile.period_type.type], st[profile.period_type.unit]]
    problems << "period_type #{period}" unless period == types.first
    problems << "period #{profile.period}" unless profile.period == 1_000_000_000 / Integer(params["sampleRate"])
    problems << "time_nanos" unless profile.time_nanos.positive? && profile.duration_nanos >= 0
    problems << "#{profile.sample.size} samples" if profile.sample.size > 16_000
    profile.sample.each do |s|
      names = s.label.map { |l| st[l.key] }
      problems << "labels #{names}" unless names.size <= 100 && names.uniq.size == names.size &&
                                           names.all? { |n| n.match?(LABEL_NAME) }
      problems << "depth #{s.location_id.size}" if s.location_id.size > 1000
      problems << "value #{s.value.to_a}" unless s.value.size == 1 && s.value.first.positive?
    end
  end
end
