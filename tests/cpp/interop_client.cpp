// Apache Thrift's C++ generated client for Interop (tests/idl/interop.thrift),
// driven by tests/test_interop_cpp.py against octo_core's Server.
//
// usage: interop_client PORT framed|buffered [SERVICE_NAME]
// SERVICE_NAME sends every call through a TMultiplexedProtocol under that name.
// Reads commands from stdin, one a line: "<method> <hex of its <method>_args struct>"
// (TBinaryProtocol), calls the method on one connection to 127.0.0.1:PORT, and
// answers each command with one line on stdout:
//   "ok <hex of its <method>_result struct>"  a value or a declared exception
//   "sent"                                    a oneway call was written
//   "app <type> <hex of the message>"         a TApplicationException
//   "error <hex of what()>"                   any other failure
// The method "ghost" is Unserved's (a method the server does not know).
// "burst N" pipelines N calls slow("burst <i>", 0) on the connection through the
// generated concurrent client (all sent, in order, before any reply is read; one
// thread waits for each reply, which may come in any order) and answers
//   "burst <hex of each reply's text, in the order sent, space-separated>".

#include <cstdlib>
#include <cstring>
#include <functional>
#include <iostream>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <thrift/async/TConcurrentClientSyncInfo.h>

#include <thrift/TApplicationException.h>
#include <thrift/protocol/TBinaryProtocol.h>
#include <thrift/protocol/TMultiplexedProtocol.h>
#include <thrift/transport/TBufferTransports.h>
#include <thrift/transport/TSocket.h>

#include "Interop.h"
#include "Unserved.h"

using apache::thrift::TApplicationException;
using apache::thrift::async::TConcurrentClientSyncInfo;
using apache::thrift::protocol::TBinaryProtocol;
using apache::thrift::protocol::TMultiplexedProtocol;
using apache::thrift::protocol::TProtocol;
using apache::thrift::transport::TBufferedTransport;
using apache::thrift::transport::TFramedTransport;
using apache::thrift::transport::TMemoryBuffer;
using apache::thrift::transport::TSocket;
using apache::thrift::transport::TTransport;
using namespace octo_interop;

static std::string to_hex(const std::string& bytes) {
  static const char digits[] = "0123456789abcdef";
  std::string out;
  for (unsigned char c : bytes) {
    out += digits[c >> 4];
    out += digits[c & 15];
  }
  return out;
}

static std::string from_hex(const std::string& hex) {
  std::string out;
  for (size_t i = 0; i + 1 < hex.size(); i += 2) {
    out += static_cast<char>(std::strtol(hex.substr(i, 2).c_str(), nullptr, 16));
  }
  return out;
}

template <class T>
static T decoded(const std::string& hex) {
  auto buffer = std::make_shared<TMemoryBuffer>();
  std::string bytes = from_hex(hex);
  buffer->write(reinterpret_cast<const uint8_t*>(bytes.data()),
                static_cast<uint32_t>(bytes.size()));
  TBinaryProtocol proto(buffer);
  T value;
  value.read(&proto);
  return value;
}

template <class T>
static std::string encoded(const T& value) {
  auto buffer = std::make_shared<TMemoryBuffer>();
  TBinaryProtocol proto(buffer);
  value.write(&proto);
  return to_hex(buffer->getBufferAsString());
}

// One method: its arguments read from hex, `call` fills in its result struct.
template <class Args, class Result>
static std::string invoke(const std::string& hex,
                          const std::function<void(const Args&, Result&)>& call) {
  Args args = decoded<Args>(hex);
  Result result;
  call(args, result);
  return "ok " + encoded(result);
}

static std::string burst(InteropConcurrentClient& client, int count) {
  std::vector<int32_t> seqids;
  for (int i = 0; i < count; ++i) {
    seqids.push_back(client.send_slow("burst " + std::to_string(i), 0));
  }
  std::vector<std::string> texts(count);
  std::vector<std::string> errors(count);
  std::vector<std::thread> waiters;
  for (int i = 0; i < count; ++i) {
    waiters.emplace_back([&, i] {
      try {
        client.recv_slow(texts[i], seqids[i]);
      } catch (const std::exception& e) {
        errors[i] = e.what();
      }
    });
  }
  for (auto& waiter : waiters) {
    waiter.join();
  }
  std::string answer = "burst";
  for (int i = 0; i < count; ++i) {
    if (!errors[i].empty()) {
      return "error " + to_hex(errors[i]);
    }
    answer += " " + to_hex(texts[i]);
  }
  return answer;
}

int main(int argc, char** argv) {
  if (argc < 3) {
    std::cerr << "usage: interop_client PORT framed|buffered [SERVICE_NAME]" << std::endl;
    return 2;
  }
  auto socket = std::make_shared<TSocket>("127.0.0.1", std::atoi(argv[1]));
  socket->setConnTimeout(5000);   // a silent server fails the command, not the test run
  socket->setRecvTimeout(5000);
  socket->setSendTimeout(5000);
  std::shared_ptr<TTransport> transport;
  if (std::strcmp(argv[2], "framed") == 0) {
    transport = std::make_shared<TFramedTransport>(socket);
  } else {
    transport = std::make_shared<TBufferedTransport>(socket);
  }
  std::shared_ptr<TProtocol> proto = std::make_shared<TBinaryProtocol>(transport);
  if (argc > 3) {
    proto = std::make_shared<TMultiplexedProtocol>(proto, argv[3]);
  }
  InteropClient client(proto);
  UnservedClient unserved(proto);
  InteropConcurrentClient pipelined(proto, std::make_shared<TConcurrentClientSyncInfo>());

  using Call = std::function<std::string(const std::string&)>;
  const std::map<std::string, Call> methods = {
    {"ping", [&](const std::string& hex) {
       return invoke<Interop_ping_args, Interop_ping_result>(
           hex, [&](const Interop_ping_args&, Interop_ping_result&) { client.ping(); });
     }},
    {"echo", [&](const std::string& hex) {
       return invoke<Interop_echo_args, Interop_echo_result>(
           hex, [&](const Interop_echo_args& a, Interop_echo_result& r) {
             client.echo(r.success, a.payload);
             r.__isset.success = true;
           });
     }},
    {"echo_variant", [&](const std::string& hex) {
       return invoke<Interop_echo_variant_args, Interop_echo_variant_result>(
           hex, [&](const Interop_echo_variant_args& a, Interop_echo_variant_result& r) {
             client.echo_variant(r.success, a.value);
             r.__isset.success = true;
           });
     }},
    {"fail", [&](const std::string& hex) {
       return invoke<Interop_fail_args, Interop_fail_result>(
           hex, [&](const Interop_fail_args& a, Interop_fail_result& r) {
             try {
               client.fail(r.success, a.kind);
               r.__isset.success = true;
             } catch (const Oops& oops) {   // (the generated __set_oops is never defined)
               r.oops = oops;
               r.__isset.oops = true;
             } catch (const Fatal& fatal) {
               r.fatal = fatal;
               r.__isset.fatal = true;
             }
           });
     }},
    {"notify", [&](const std::string& hex) {
       client.notify(decoded<Interop_notify_args>(hex).event);
       return std::string("sent");
     }},
    {"notes", [&](const std::string& hex) {
       return invoke<Interop_notes_args, Interop_notes_result>(
           hex, [&](const Interop_notes_args&, Interop_notes_result& r) {
             client.notes(r.success);
             r.__isset.success = true;
           });
     }},
    {"slow", [&](const std::string& hex) {
       return invoke<Interop_slow_args, Interop_slow_result>(
           hex, [&](const Interop_slow_args& a, Interop_slow_result& r) {
             client.slow(r.success, a.text, a.delay_ms);
             r.__isset.success = true;
           });
     }},
    {"ghost", [&](const std::string& hex) {
       return invoke<Unserved_ghost_args, Unserved_ghost_result>(
           hex, [&](const Unserved_ghost_args&, Unserved_ghost_result&) { unserved.ghost(); });
     }},
    {"burst", [&](const std::string& count) { return burst(pipelined, std::stoi(count)); }},
  };

  transport->open();
  std::string line;
  while (std::getline(std::cin, line)) {
    std::string method = line.substr(0, line.find(' '));
    std::string hex = line.find(' ') == std::string::npos ? "" : line.substr(line.find(' ') + 1);
    std::string answer;
    try {
      auto found = methods.find(method);
      if (found == methods.end()) {
        answer = "error " + to_hex("no such command: " + method);
      } else {
        answer = found->second(hex);
      }
    } catch (const TApplicationException& e) {
      answer = "app " + std::to_string(e.getType()) + " " + to_hex(e.what());
    } catch (const std::exception& e) {
      answer = "error " + to_hex(e.what());
    }
    std::cout << answer << std::endl;
  }
  transport->close();
  return 0;
}
