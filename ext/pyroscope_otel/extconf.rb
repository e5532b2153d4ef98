# frozen_string_literal: true

# Builds pyroscope_otel.so. Every library is looked up with pkg-config first; a missing
# one stops the build with the package that provides it on each common system.
# Options: --enable-werror (used by `rake compile`, so CI fails on any warning),
#          --with-sanitize=address,undefined (see `rake spec:asan`).
require "mkmf"

PACKAGES = {
  "libcurl" => { header: "curl/curl.h", lib: "curl", func: "curl_easy_init",
                 debian: "libcurl4-openssl-dev", fedora: "libcurl-devel", alpine: "curl-dev", macos: "curl" },
  "libprotobuf-c" => { header: "protobuf-c/protobuf-c.h", lib: "protobuf-c", func: "protobuf_c_message_pack",
                       debian: "libprotobuf-c-dev", fedora: "protobuf-c-devel", alpine: "protobuf-c-dev",
                       macos: "protobuf-c" },
  "zlib" => { header: "zlib.h", lib: "z", func: "deflate",
              debian: "zlib1g-dev", fedora: "zlib-devel", alpine: "zlib-dev", macos: "zlib" },
}.freeze

def require_package(name, spec)
  pkg_config(name)
  return if have_header(spec[:header]) && have_library(spec[:lib], spec[:func], spec[:header])

  abort <<~MSG

    pyroscope-otel: #{name} (#{spec[:header]}) was not found. Install it, then build again:
      Debian/Ubuntu:  sudo apt-get install #{spec[:debian]}
      Fedora/RHEL:    sudo dnf install #{spec[:fedora]}
      Alpine:         apk add #{spec[:alpine]}
      macOS:          brew install #{spec[:macos]}
    (or run bin/setup in a checkout, which installs all of them on Debian/Ubuntu)
  MSG
end

PACKAGES.each { |name, spec| require_package(name, spec) }

unless have_func("timer_create", "time.h") || (have_library("rt", "timer_create", "time.h"))
  abort "pyroscope-otel: the sampler needs POSIX per-thread CPU timers (timer_create, SIGEV_THREAD_ID): Linux only"
end

# Version-dependent Ruby APIs, detected by what the headers and libruby offer.
have_func("rb_internal_thread_add_event_hook", "ruby/thread.h")       # 3.2: thread and GVL events
have_func("rb_internal_thread_specific_key_create", "ruby/thread.h")  # 3.3: M:N threads exist
have_func("rb_postponed_job_preregister", "ruby/debug.h")            # 3.3: signal-free sampling
unless $defs.include?("-DHAVE_RB_INTERNAL_THREAD_ADD_EVENT_HOOK") || have_func("ruby_thread_has_gvl_p")
  abort "pyroscope-otel: this Ruby has neither thread event hooks nor ruby_thread_has_gvl_p"
end

# Ruby's own headers are system headers to us: -Wextra finds unused parameters in the
# inline functions of some Ruby versions' headers, which -Werror must not fail on.
$INCFLAGS = $INCFLAGS.gsub(/-I(\$\((?:arch_)?hdrdir\)\S*)/, '-isystem \1')
$CFLAGS << " -std=gnu11 -Wall -Wextra -fvisibility=hidden"
$CFLAGS << " -Werror" if enable_config("werror", false)
if (sanitize = with_config("sanitize"))
  flags = " -fsanitize=#{sanitize} -fno-omit-frame-pointer -fno-sanitize-recover=all -g -O1"
  $CFLAGS << flags
  $LDFLAGS << flags
end

create_makefile("pyroscope/pyroscope_otel")
