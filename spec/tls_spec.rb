# frozen_string_literal: true

require "logger"
require "openssl"
require "socket"
require "stringio"

# An https server whose certificate nobody trusts: the upload is refused by certificate
# verification, logged once, and no byte of the profile goes out in clear.
RSpec.describe "Uploading to a server with an untrusted certificate" do
  let(:log) { StringIO.new }

  def self_signed
    key = OpenSSL::PKey::RSA.new(2048)
    cert = OpenSSL::X509::Certificate.new
    cert.version = 2
    cert.serial = 1
    cert.subject = cert.issuer = OpenSSL::X509::Name.parse("/CN=127.0.0.1")
    cert.public_key = key.public_key
    cert.not_before = Time.now - 60
    cert.not_after = Time.now + 3600
    cert.sign(key, OpenSSL::Digest.new("SHA256"))
    [cert, key]
  end

  it "refuses, logs once, and sends nothing in clear" do
    cert, key = self_signed
    ctx = OpenSSL::SSL::SSLContext.new
    ctx.cert = cert
    ctx.key = key
    tcp = TCPServer.new("127.0.0.1", 0)
    handshakes = Queue.new
    plaintext = Queue.new
    server = Thread.new do
      loop do
        sock = tcp.accept
        ssl = OpenSSL::SSL::SSLSocket.new(sock, ctx)
        begin
          ssl.accept
          plaintext << ssl.readpartial(4096) # only reached if the client trusted us
        rescue OpenSSL::SSL::SSLError, EOFError, Errno::ECONNRESET => e
          handshakes << e.class
        ensure
          sock.close
        end
      end
    rescue IOError
      nil
    end

    configure_pyroscope("tls.app", "https://127.0.0.1:#{tcp.addr[1]}", logger: Logger.new(log), log_level: "info",
                        upload_interval: 0.3, connect_timeout: 1, timeout: 2)
    failed_before = Pyroscope::Native.upload_stats[:windows_failed] + Pyroscope::Native.upload_stats[:retries]
    4.times { Workload.new.heavy(0.1) && sleep(0.35) }
    Pyroscope.shutdown
    stats = Pyroscope::Native.upload_stats
    expect(handshakes.size).to be >= 1
    expect(plaintext).to be_empty
    expect(stats[:windows_failed] + stats[:retries]).to be > failed_before
    expect(stats[:last_error]).to match(/certificate|SSL/i)
    # once, not once per window (a window an earlier spec left queued for its closed server
    # may fail here too: that server's failure is logged on its own)
    expect(log.string.scan(%r{upload to https://127\.0\.0\.1:#{tcp.addr[1]}/ingest failed}).size).to eq(1), log.string
    expect(log.string).not_to include("tls.app{") # no profile content in the log either
  ensure
    tcp&.close
    server&.join(2)
  end
end
