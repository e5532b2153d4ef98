# frozen_string_literal: true

# A real Rails app (railties + actionpack) in its own process: the Railtie wraps every
# action in tag_wrapper({ "action" => "controller/action" }).
RSpec.describe "Pyroscope in a Rails app" do
  let(:receiver) { ContractReceiver.new }

  after { receiver.close }

  def run_app(autoinstrument:)
    run_ruby(<<~RUBY)
      require "rails"
      require "action_controller/railtie"
      require "pyroscope"
      require "rack/mock"

      class SpecApp < Rails::Application
        config.eager_load = false
        config.logger = Logger.new(nil)
        config.secret_key_base = "x" * 64
        config.hosts.clear
        routes.append do
          get "/bikes/:id" => "bikes#show"
          get "/cars" => "cars#index"
        end
      end

      class BikesController < ActionController::Base
        def show = render(plain: find_nearest_bike.to_s)
        private def find_nearest_bike = burn(0.15)
      end

      class CarsController < ActionController::Base
        def index = render(plain: find_nearest_car.to_s)
        private def find_nearest_car = burn(0.15)
      end

      def burn(seconds)
        stop_at = Process.clock_gettime(Process::CLOCK_THREAD_CPUTIME_ID) + seconds
        x = 0
        x += 1 while Process.clock_gettime(Process::CLOCK_THREAD_CPUTIME_ID) < stop_at
        x
      end

      SpecApp.initialize!
      Pyroscope.configure do |c|
        c.application_name = "rails.app"
        c.server_address = #{receiver.url.inspect}
        c.autoinstrument_rails = #{autoinstrument}
      end
      request = Rack::MockRequest.new(SpecApp)
      puts request.get("/bikes/7").status
      puts request.get("/cars").status
    RUBY
  end

  it "labels each action's samples with controller/action" do
    out, err, status = run_app(autoinstrument: true)
    expect(status).to be_success, err
    expect(out).to eq("200\n200\n")
    receiver.wait_for(1)
    frames_by_action = receiver.samples.group_by { |s| s[:labels]["action"] }
                               .transform_values { |ss| ss.flat_map { |s| s[:frames].map(&:first) } }
    expect(frames_by_action["bikes/show"]).to include("BikesController#find_nearest_bike")
    expect(frames_by_action["bikes/show"]).not_to include("CarsController#find_nearest_car")
    expect(frames_by_action["cars/index"]).to include("CarsController#find_nearest_car")
    expect(frames_by_action["cars/index"]).not_to include("BikesController#find_nearest_bike")
  end

  it "adds no label with autoinstrument_rails = false" do
    _, err, status = run_app(autoinstrument: false)
    expect(status).to be_success, err
    receiver.wait_for(1)
    expect(receiver.samples.map { |s| s[:labels]["action"] }.compact).to be_empty
    expect(receiver.samples.flat_map { |s| s[:frames].map(&:first) }).to include("BikesController#find_nearest_bike")
  end
end
