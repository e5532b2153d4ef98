# frozen_string_literal: true

require "open3"

# bin/storm's short form: span threads, thread churn, compaction and forks at 1 000 Hz
# together; the full form (600 s) runs on demand: bin/storm.
RSpec.describe "bin/storm" do
  it "ends with no crash and nothing of the extension's left behind" do
    storm = File.expand_path("../bin/storm", __dir__)
    stdout, stderr, status = Open3.capture3(RbConfig.ruby, storm, "--seconds", "8")
    expect(status).to be_success, "#{stdout}\n#{stderr}"
    expect(stdout).to include("storm ok")
    expect(stdout).to match(/\d+ spans, \d+ threads started, [1-9]\d* compactions, [1-9]\d* forks/)
  end
end
