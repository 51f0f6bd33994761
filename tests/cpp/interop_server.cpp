// Apache Thrift's C++ TThreadedServer serving Interop (tests/idl/interop.thrift),
// the peer tests/test_interop_cpp.py calls octo_core's clients against.
//
// usage: interop_server framed|buffered [SERVICE_NAME...]
// With service names, a TMultiplexedProcessor serves Interop under each of them.
// Binds a free port of 127.0.0.1, prints "PORT <n>" once listening, and serves
// until it is killed.

#include <chrono>
#include <cstring>
#include <iostream>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <thrift/processor/TMultiplexedProcessor.h>
#include <thrift/protocol/TBinaryProtocol.h>
#include <thrift/server/TThreadedServer.h>
#include <thrift/transport/TBufferTransports.h>
#include <thrift/transport/TServerSocket.h>

#include "Interop.h"

using apache::thrift::TMultiplexedProcessor;
using apache::thrift::TProcessor;
using apache::thrift::protocol::TBinaryProtocolFactory;
using apache::thrift::server::TServerEventHandler;
using apache::thrift::server::TThreadedServer;
using apache::thrift::transport::TBufferedTransportFactory;
using apache::thrift::transport::TFramedTransportFactory;
using apache::thrift::transport::TServerSocket;
using apache::thrift::transport::TTransportFactory;
using namespace octo_interop;

// Behaves as InteropHandler in tests/test_interop_cpp.py does.
class Handler : public InteropIf {
 public:
  void ping() override {}

  void echo(Everything& out, const Everything& payload) override { out = payload; }

  void echo_variant(Variant& out, const Variant& value) override { out = value; }

  void fail(std::string& out, const std::string& kind) override {
    if (kind == "oops") {
      Oops oops;
      oops.__set_message("refused on purpose");
      oops.__set_code(42);
      throw oops;
    }
    if (kind == "fatal") {
      Fatal fatal;
      fatal.__set_reason("fatal");
      fatal.__set_trace({"a", "b"});
      throw fatal;
    }
    if (kind == "undeclared") {
      throw std::runtime_error("boom");
    }
    out = kind;
  }

  void notify(const std::string& event) override {
    std::lock_guard<std::mutex> hold(lock_);
    events_.push_back(event);
  }

  void notes(std::vector<std::string>& out) override {
    std::lock_guard<std::mutex> hold(lock_);
    out = events_;
  }

  void slow(std::string& out, const std::string& text, int32_t delay_ms) override {
    std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms));
    out = text;
  }

 private:
  std::mutex lock_;               // connections run on threads of their own
  std::vector<std::string> events_;
};

// Says which port port 0 became, once the socket listens.
class PortReporter : public TServerEventHandler {
 public:
  explicit PortReporter(std::shared_ptr<TServerSocket> socket) : socket_(std::move(socket)) {}

  void preServe() override { std::cout << "PORT " << socket_->getPort() << std::endl; }

 private:
  std::shared_ptr<TServerSocket> socket_;
};

int main(int argc, char** argv) {
  if (argc < 2 || (std::strcmp(argv[1], "framed") != 0 && std::strcmp(argv[1], "buffered") != 0)) {
    std::cerr << "usage: interop_server framed|buffered [SERVICE_NAME...]" << std::endl;
    return 2;
  }
  std::shared_ptr<TTransportFactory> transports;
  if (std::strcmp(argv[1], "framed") == 0) {
    transports = std::make_shared<TFramedTransportFactory>();
  } else {
    transports = std::make_shared<TBufferedTransportFactory>();
  }
  auto handler = std::make_shared<Handler>();   // one, so notes() sees every connection's
  std::shared_ptr<TProcessor> processor = std::make_shared<InteropProcessor>(handler);
  if (argc > 2) {
    auto multiplexed = std::make_shared<TMultiplexedProcessor>();
    for (int i = 2; i < argc; ++i) {
      multiplexed->registerProcessor(argv[i], processor);
    }
    processor = multiplexed;
  }
  auto socket = std::make_shared<TServerSocket>("127.0.0.1", 0);
  TThreadedServer server(processor, socket, transports, std::make_shared<TBinaryProtocolFactory>());
  server.setServerEventHandler(std::make_shared<PortReporter>(socket));
  server.serve();
  return 0;
}
