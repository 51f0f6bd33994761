// Apache Thrift's Java library serving Interop (tests/idl/interop.thrift): the peer
// tests/test_interop_java.py calls octo_core's clients against.
//
// usage: InteropServer threadpool|selector [SERVICE_NAME...] [--default] [--strict-read]
//   threadpool  a TThreadPoolServer (a thread per connection)
//   selector    a TThreadedSelectorServer (selector threads and a worker pool)
// Framed transport (16,384,000-byte frames at most), binary protocol with the
// library's defaults (strictRead off, strictWrite on); --strict-read refuses a
// message without the versioned header. With service names, a TMultiplexedProcessor
// serves Interop under each of them; --default also serves calls that name no
// service (registerDefault). Binds a free port of 127.0.0.1, prints "PORT <n>" once
// listening, and serves until it is killed.

import java.net.InetSocketAddress;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.Collections;
import java.util.List;

import org.apache.thrift.TException;
import org.apache.thrift.TMultiplexedProcessor;
import org.apache.thrift.TProcessor;
import org.apache.thrift.protocol.TBinaryProtocol;
import org.apache.thrift.protocol.TProtocol;
import org.apache.thrift.server.ServerContext;
import org.apache.thrift.server.TServer;
import org.apache.thrift.server.TServerEventHandler;
import org.apache.thrift.server.TThreadPoolServer;
import org.apache.thrift.server.TThreadedSelectorServer;
import org.apache.thrift.transport.TNonblockingServerSocket;
import org.apache.thrift.transport.TServerSocket;
import org.apache.thrift.transport.TTransport;
import org.apache.thrift.transport.TTransportException;
import org.apache.thrift.transport.layered.TFramedTransport;

public class InteropServer {
  /** Behaves as InteropHandler in tests/interop_cases.py does. */
  static class Handler implements Interop.Iface {
    // connections run on threads of their own
    private final List<String> events = Collections.synchronizedList(new ArrayList<>());

    @Override
    public void ping() {}

    @Override
    public Everything echo(Everything payload) {
      return payload;
    }

    @Override
    public Variant echo_variant(Variant value) {
      return value;
    }

    @Override
    public String fail(String kind) throws TException {
      switch (kind) {
        case "oops":
          throw new Oops().setMessage("refused on purpose").setCode(42);
        case "fatal":
          throw new Fatal("fatal").setTrace(Arrays.asList("a", "b"));
        case "undeclared":
          throw new IllegalStateException("boom");
        default:
          return kind;
      }
    }

    @Override
    public void notify(String event) {
      events.add(event);
    }

    @Override
    public List<String> notes() {
      synchronized (events) {
        return new ArrayList<>(events);
      }
    }

    @Override
    public String slow(String text, int delayMs) throws TException {
      try {
        Thread.sleep(delayMs);
      } catch (InterruptedException e) {
        throw new TException(e);
      }
      return text;
    }
  }

  /** Says which port port 0 became, once the server listens. */
  static class PortReporter implements TServerEventHandler {
    private final int port;

    PortReporter(int port) {
      this.port = port;
    }

    @Override
    public void preServe() {
      System.out.println("PORT " + port);
      System.out.flush();
    }

    @Override
    public ServerContext createContext(TProtocol in, TProtocol out) {
      return null;
    }

    @Override
    public void deleteContext(ServerContext context, TProtocol in, TProtocol out) {}

    @Override
    public void processContext(ServerContext context, TTransport in, TTransport out) {}
  }

  static TProcessor processor(List<String> names, boolean asDefault) {
    TProcessor plain = new Interop.Processor<>(new Handler());
    if (names.isEmpty()) {
      return plain;
    }
    TMultiplexedProcessor multiplexed = new TMultiplexedProcessor();
    for (String name : names) {
      multiplexed.registerProcessor(name, plain);
    }
    if (asDefault) {
      multiplexed.registerDefault(plain);
    }
    return multiplexed;
  }

  static TServer server(String kind, TProcessor processor, boolean strictRead)
      throws TTransportException {
    InetSocketAddress any = new InetSocketAddress("127.0.0.1", 0);
    TBinaryProtocol.Factory protocol = new TBinaryProtocol.Factory(strictRead, true);
    if (kind.equals("threadpool")) {
      TServerSocket socket = new TServerSocket(any);
      TServer server = new TThreadPoolServer(new TThreadPoolServer.Args(socket)
          .processor(processor)
          .transportFactory(new TFramedTransport.Factory())
          .protocolFactory(protocol));
      server.setServerEventHandler(new PortReporter(socket.getServerSocket().getLocalPort()));
      return server;
    }
    TNonblockingServerSocket socket = new TNonblockingServerSocket(any);
    TServer server = new TThreadedSelectorServer(new TThreadedSelectorServer.Args(socket)
        .processor(processor)
        .protocolFactory(protocol));
    server.setServerEventHandler(new PortReporter(socket.getPort()));
    return server;
  }

  public static void main(String[] args) throws Exception {
    if (args.length < 1 || !Arrays.asList("threadpool", "selector").contains(args[0])) {
      System.err.println("usage: InteropServer threadpool|selector [SERVICE_NAME...] [--default]"
          + " [--strict-read]");
      System.exit(2);
    }
    List<String> names = new ArrayList<>(Arrays.asList(args).subList(1, args.length));
    boolean asDefault = names.remove("--default");
    boolean strictRead = names.remove("--strict-read");
    server(args[0], processor(names, asDefault), strictRead).serve();
  }
}
