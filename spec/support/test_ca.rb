# frozen_string_literal: true

require "openssl"
require "tmpdir"

# A certificate authority of the spec's own and a server certificate it signed for
# 127.0.0.1: `context` serves https (ContractReceiver's tls:), `ca_file` is what the client
# is told to trust (a file of its own, removed by `remove`).
class TestCA
  attr_reader :ca_file

  def initialize
    @ca_key = OpenSSL::PKey::EC.generate("prime256v1")
    @ca = certificate("/CN=pyroscope-otel spec CA", @ca_key, @ca_key, nil, ca: true)
    @key = OpenSSL::PKey::EC.generate("prime256v1")
    @cert = certificate("/CN=127.0.0.1", @key, @ca_key, @ca, ca: false)
    @ca_file = File.join(Dir.tmpdir, "pyroscope-spec-ca-#{Process.pid}-#{object_id}.pem")
    File.write(@ca_file, @ca.to_pem)
  end

  def context
    ctx = OpenSSL::SSL::SSLContext.new
    ctx.cert = @cert
    ctx.key = @key
    ctx
  end

  def remove
    File.delete(@ca_file) if File.exist?(@ca_file)
  end

  private

  def certificate(subject, key, signer_key, issuer, ca:)
    cert = OpenSSL::X509::Certificate.new
    cert.version = 2
    cert.serial = OpenSSL::BN.rand(64)
    cert.subject = OpenSSL::X509::Name.parse(subject)
    cert.issuer = issuer ? issuer.subject : cert.subject
    cert.public_key = key
    cert.not_before = Time.now - 60
    cert.not_after = Time.now + 3600
    ext = OpenSSL::X509::ExtensionFactory.new
    ext.subject_certificate = cert
    ext.issuer_certificate = issuer || cert
    if ca
      cert.add_extension(ext.create_extension("basicConstraints", "CA:TRUE", true))
      cert.add_extension(ext.create_extension("keyUsage", "keyCertSign,cRLSign", true))
    else
      cert.add_extension(ext.create_extension("basicConstraints", "CA:FALSE", true))
      cert.add_extension(ext.create_extension("subjectAltName", "IP:127.0.0.1", false))
    end
    cert.sign(signer_key, OpenSSL::Digest.new("SHA256"))
    cert
  end
end
