# frozen_string_literal: true

require "open3"

# bin/soak's short form: a long-running server's life (reconfigures, timeouts, killed
# threads, forks, a daemon, a flaky TLS receiver) compressed into seconds; its verdict
# compares every process's counters with what the receiver holds. The 30-minute form runs
# on demand: bin/soak --seconds 1800.
RSpec.describe "bin/soak" do
  it "ends with no crash, flat memory, nothing left behind and every window sent received" do
    soak = File.expand_path("../bin/soak", __dir__)
    stdout, stderr, status = Open3.capture3(RbConfig.ruby, soak, "--seconds", "40")
    expect(status).to be_success, "#{stdout}\n#{stderr}"
    expect(stdout).to include("soak ok")
    expect(stdout).to match(/[1-9]\d* timeouts, [1-9]\d* killed threads, [1-9]\d* reconfigures, [1-9]\d* forks, daemon ok/)
  end
end
