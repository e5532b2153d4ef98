# frozen_string_literal: true

# Ruby stacks shaped like a Rails app's: 150 frames that every request has (the server, the
# middleware), then levels that branch on the decimal digits of a stack's number, each
# followed by a chain of frames (routing, controller, models, views): the last digit's 25
# and the leaf are each stack's own. Numbers 0...10 000 are as many distinct 200-frame
# stacks below the caller's (one generated method per frame; a level is distinct per digit
# by the line that calls on).
module DeepStacks
  SHARED = 150
  CHAINS = [5, 5, 10, 24].freeze # frames below each level; with the levels and the leaf: 200

  src = +""
  SHARED.times { |k| src << "def self.s#{k}(i, &b) = s#{k + 1}(i, &b)\n" }
  src << "def self.s#{SHARED}(i, &b) = l0(i, &b)\n"
  CHAINS.each_with_index do |chain, level|
    src << "def self.l#{level}(i, &b)\n  case i / #{10**(CHAINS.size - 1 - level)} % 10\n"
    10.times { |digit| src << "  when #{digit} then c#{level}_0(i, &b)\n" }
    src << "  end\nend\n"
    chain.times do |k|
      after = k + 1 < chain ? "c#{level}_#{k + 1}" : (level + 1 < CHAINS.size ? "l#{level + 1}" : "leaf")
      src << "def self.c#{level}_#{k}(i, &b) = #{after}(i, &b)\n"
    end
  end
  src << "def self.leaf(i) = yield(i)\n"
  module_eval(src, "deep_stacks_generated.rb", 1)

  # Yields each number in `numbers` at the leaf of its stack.
  def self.each(numbers, &block)
    numbers.each { |i| s0(i, &block) }
  end
end
