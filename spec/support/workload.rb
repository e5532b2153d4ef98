# frozen_string_literal: true

# Named methods with known CPU costs, so that tests can find them on sampled stacks.
class Workload
  include ProfileHelpers

  def heavy(seconds) = burn(seconds)
  def light(seconds) = burn(seconds)
  def worker_one(seconds) = burn(seconds)
  def worker_two(seconds) = burn(seconds)
  def find_nearest_bike(seconds) = burn(seconds)
  def find_nearest_scooter(seconds) = burn(seconds)
  def find_nearest_car(seconds) = burn(seconds)

  # Short-lived garbage for `seconds` of CPU, enough to run a minor GC every few ms.
  def allocate_garbage(seconds)
    stop_at = thread_cpu + seconds
    kept = nil
    kept = Array.new(64) { |i| "s#{i}" } while thread_cpu < stop_at
    kept
  end

  def recurse(depth, seconds)
    depth.zero? ? burn(seconds) : recurse(depth - 1, seconds)
  end

  # CPU burnt without the GVL (needs `require "zlib"`): zlib inflates with it released from
  # start to end (given no block, it grows the output buffer without it too). Into a reused
  # buffer: no garbage, so no GC, whose CPU would show on a stackless "(garbage collection)"
  # frame.
  def inflate_blob(blob, buffer)
    inflater = Zlib::Inflate.new
    inflater.inflate(blob, buffer: buffer)
  ensure
    inflater&.close
  end
end
