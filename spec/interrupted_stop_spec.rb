# frozen_string_literal: true

# stop is one step: an interrupt (Thread#raise, a trap) arriving while it runs is raised
# after it, never half-way. A stop cut short left every thread tracked with the CPU clock
# it had at the cut, so the next start charged the CPU burnt while stopped to the first
# sample or label change.
RSpec.describe "Pyroscope::Native.stop under interrupts" do
  let(:native) { Pyroscope::Native }

  # (Ruby 3.1 warns at each start that the mode takes no timer samples there)
  def start_signal_free
    verbose, $VERBOSE = $VERBOSE, nil
    native.start(sample_rate: 10, no_signals: true)
  ensure
    $VERBOSE = verbose
  end

  # Runs Native.stop on a thread of its own, which another thread raises at once it is in.
  def stop_raised_at
    entered = false
    stopper = Thread.new do
      Thread.current.report_on_exception = false
      entered = true
      native.stop
      sleep # the raise lands here once stop has returned
    rescue RuntimeError
      nil
    end
    Thread.pass until entered
    stopper.raise("interrupt during stop")
    stopper.join
  end

  # Runs Native.stop on this (the main) thread while another thread sends it a signal whose
  # trap raises.
  def stop_trapped
    previous = trap("USR2") { raise "trap during stop" }
    entered = false
    sender = Thread.new do
      Thread.pass until entered
      Process.kill(:USR2, Process.pid)
    end
    begin
      entered = true
      native.stop
      sleep # the trap raises here once stop has returned
    rescue RuntimeError
      nil
    end
    sender.join
  ensure
    trap("USR2", previous)
  end

  { "a Thread#raise" => :stop_raised_at, "a trap" => :stop_trapped }.each do |interrupt, stop_interrupted|
    it "finishes stop whatever interrupts arrive (#{interrupt}), so a restart charges no CPU burnt while stopped" do
      # The signal-free mode's stop joins its ticker thread; at 10 Hz the ticker sleeps up
      # to 100 ms, which is where the interrupt landed (Ruby >= 3.3; 3.1 has no ticker).
      5.times do
        start_signal_free
        send(stop_interrupted)
        native.stop if native.running? # the interrupt came before stop began: nothing was cut short
        native.set_labels({ "probe" => "after restart" })
        burn(0.1) # while stopped: nobody's CPU
        before_start = native.thread_cpu_ns
        start_signal_free
        native.clear_labels # charges the CPU since start to the probe label
        spent = native.thread_cpu_ns - before_start
        native.stop
        probe = take_samples.select { |_, labels, *| labels["probe"] }.sum { |s| s[2] }
        # before: 100-130 ms on the probe label (the burn) against ~0.2 ms spent, at every round
        expect(probe).to be <= spent
      end
    end
  end
end
