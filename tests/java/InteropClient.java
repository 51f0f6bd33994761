// Apache Thrift's Java generated client for Interop (tests/idl/interop.thrift), driven
// by tests/test_interop_java.py against octo_core's Server.
//
// usage: InteropClient PORT framed|buffered [SERVICE_NAME] [--old-header]
// SERVICE_NAME sends every call through a TMultiplexedProtocol under that name;
// --old-header writes the non-strict message header (strictWrite off). Reads
// commands from stdin, one a line, and answers each with one line on stdout, as
// tests/cpp/interop_client.cpp does:
//   "<method> <hex of its <method>_args struct>" (TBinaryProtocol), called on one
//   connection to 127.0.0.1:PORT, answers
//     "ok <hex of its <method>_result struct>"  a value or a declared exception
//     "sent"                                    a oneway call was written
//     "app <type> <hex of the message>"         a TApplicationException
//     "error <hex of the message>"              any other failure
//   The method "ghost" is Unserved's (a method the server does not know).
//   "threads N CALLS" makes CALLS calls slow("call <i>", i % 2) from N threads,
//   each on a connection of its own (a Java client has one call in flight on a
//   connection), and answers "threads <hex of each reply's text, in call order>".

import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.lang.reflect.InvocationTargetException;
import java.lang.reflect.Method;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.Collections;
import java.util.HexFormat;
import java.util.List;
import java.util.Map;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;

import org.apache.thrift.TApplicationException;
import org.apache.thrift.TBase;
import org.apache.thrift.TDeserializer;
import org.apache.thrift.TException;
import org.apache.thrift.TFieldIdEnum;
import org.apache.thrift.TSerializer;
import org.apache.thrift.meta_data.FieldMetaData;
import org.apache.thrift.meta_data.StructMetaData;
import org.apache.thrift.protocol.TBinaryProtocol;
import org.apache.thrift.protocol.TMultiplexedProtocol;
import org.apache.thrift.protocol.TProtocol;
import org.apache.thrift.transport.TSocket;
import org.apache.thrift.transport.TTransport;
import org.apache.thrift.transport.layered.TFramedTransport;

public class InteropClient {
  private static final HexFormat HEX = HexFormat.of();
  private static final int TIMEOUT_MS = 10_000;   // a silent server fails the command

  /** One connection, as the command line describes it. */
  static class Connection {
    final TTransport transport;
    final Interop.Client interop;
    final Unserved.Client unserved;

    Connection(String[] args) throws TException {
      TTransport socket = new TSocket("127.0.0.1", Integer.parseInt(args[0]), TIMEOUT_MS);
      transport = args[1].equals("framed") ? new TFramedTransport(socket) : socket;
      boolean oldHeader = List.of(args).contains("--old-header");
      TProtocol protocol = new TBinaryProtocol(transport, false, !oldHeader);
      if (args.length > 2 && !args[2].startsWith("--")) {
        protocol = new TMultiplexedProtocol(protocol, args[2]);
      }
      interop = new Interop.Client(protocol);
      unserved = new Unserved.Client(protocol);
      transport.open();
    }

    /** The answer line to one "<method> <hex>" command. */
    String call(String method, String hex) throws Exception {
      Object client = method.equals("ghost") ? unserved : interop;
      String service = client.getClass().getEnclosingClass().getName();
      TBase<?, ?> arguments = newStruct(Class.forName(service + "$" + method + "_args"));
      new TDeserializer(new TBinaryProtocol.Factory()).deserialize(arguments, HEX.parseHex(hex));
      List<Object> values = new ArrayList<>();
      for (TFieldIdEnum field : fields(arguments.getClass()).keySet()) {   // in the IDL's order
        values.add(getField(arguments, field));
      }
      Method call = findMethod(client.getClass(), method);
      Class<?> resultClass = classOrNull(service + "$" + method + "_result");
      TBase<?, ?> result = resultClass == null ? null : newStruct(resultClass);   // null: oneway
      try {
        Object value = call.invoke(client, values.toArray());
        if (result == null) {
          return "sent";
        }
        if (call.getReturnType() != void.class) {
          setField(result, result.fieldForId(0), value);
        }
      } catch (InvocationTargetException e) {
        Throwable thrown = e.getCause();
        TFieldIdEnum declared = result == null ? null : declaredFor(result, thrown);
        if (declared == null) {
          throw (Exception) thrown;
        }
        setField(result, declared, thrown);
      }
      return "ok " + HEX.formatHex(new TSerializer(new TBinaryProtocol.Factory()).serialize(result));
    }
  }

  /** The result field that holds {@code thrown}, a declared exception (else null). */
  static TFieldIdEnum declaredFor(TBase<?, ?> result, Throwable thrown) {
    for (Map.Entry<? extends TFieldIdEnum, FieldMetaData> field : fields(result.getClass()).entrySet()) {
      if (field.getValue().valueMetaData instanceof StructMetaData
          && ((StructMetaData) field.getValue().valueMetaData).structClass == thrown.getClass()) {
        return field.getKey();
      }
    }
    return null;
  }

  static Map<? extends TFieldIdEnum, FieldMetaData> fields(Class<?> struct) {
    @SuppressWarnings("unchecked")
    Class<? extends TBase<?, ?>> cls = (Class<? extends TBase<?, ?>>) struct;
    return FieldMetaData.getStructMetaDataMap(cls);
  }

  @SuppressWarnings({"unchecked", "rawtypes"})
  static Object getField(TBase struct, TFieldIdEnum field) {
    return struct.getFieldValue(field);
  }

  @SuppressWarnings({"unchecked", "rawtypes"})
  static void setField(TBase struct, TFieldIdEnum field, Object value) {
    struct.setFieldValue(field, value);
  }

  static TBase<?, ?> newStruct(Class<?> cls) throws Exception {
    return (TBase<?, ?>) cls.getDeclaredConstructor().newInstance();
  }

  static Class<?> classOrNull(String name) {
    try {
      return Class.forName(name);
    } catch (ClassNotFoundException e) {
      return null;
    }
  }

  static Method findMethod(Class<?> cls, String name) {
    for (Method method : cls.getMethods()) {
      if (method.getName().equals(name)) {
        return method;
      }
    }
    throw new IllegalArgumentException("no such method: " + name);
  }

  /** "threads N CALLS": the calls spread over N threads and connections. */
  static String threads(String[] args, int threads, int calls) throws Exception {
    ExecutorService pool = Executors.newFixedThreadPool(threads);
    ThreadLocal<Connection> connections = new ThreadLocal<>();
    List<Connection> opened = Collections.synchronizedList(new ArrayList<>());
    try {
      List<Future<String>> replies = new ArrayList<>();
      for (int i = 0; i < calls; ++i) {
        final int index = i;
        replies.add(pool.submit(() -> {
          if (connections.get() == null) {
            connections.set(new Connection(args));
            opened.add(connections.get());
          }
          return connections.get().interop.slow("call " + index, index % 2);
        }));
      }
      StringBuilder answer = new StringBuilder("threads");
      for (Future<String> reply : replies) {
        answer.append(' ').append(hex(reply.get()));
      }
      return answer.toString();
    } finally {
      pool.shutdownNow();
      for (Connection connection : opened) {
        connection.transport.close();
      }
    }
  }

  static String hex(String text) {
    return HEX.formatHex(String.valueOf(text).getBytes(StandardCharsets.UTF_8));
  }

  public static void main(String[] args) throws Exception {
    if (args.length < 2) {
      System.err.println(
          "usage: InteropClient PORT framed|buffered [SERVICE_NAME] [--old-header]");
      System.exit(2);
    }
    Connection connection = new Connection(args);
    BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
    String line;
    while ((line = in.readLine()) != null) {
      String[] command = line.split(" ", -1);
      String answer;
      try {
        if (command[0].equals("threads")) {
          answer = threads(args, Integer.parseInt(command[1]), Integer.parseInt(command[2]));
        } else {
          answer = connection.call(command[0], command.length > 1 ? command[1] : "");
        }
      } catch (TApplicationException e) {
        answer = "app " + e.getType() + " " + hex(e.getMessage());
      } catch (Exception e) {
        answer = "error " + hex(e.toString());
      }
      System.out.println(answer);
      System.out.flush();
    }
    connection.transport.close();
  }
}
