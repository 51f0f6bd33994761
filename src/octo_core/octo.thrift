// The OCTO unified protocol header (shared/PROTOCOL.md §2). Loaded at import by
// octo_core.protocol and encoded/decoded by the C codec like any other struct.

enum MessageType { Normal = 0, NormalHeartbeat = 1, ScannerHeartbeat = 2 }
enum CallType { Reply = 0, NoReply = 1 }

struct RequestInfo {
  1: required string serviceName,
  2: required i64 sequenceId,
  3: required byte callType,
  4: required i32 timeout,
}

struct ResponseInfo {
  1: required i64 sequenceId,
  2: required byte status,
  3: optional string message,
}

struct TraceInfo {
  1: required string clientAppkey,
  2: optional string traceId,
  3: optional string spanId,
  4: optional string rootMessageId,
  5: optional string currentMessageId,
  6: optional string serverMessageId,
  7: optional bool debug,
  8: optional bool sample,
  9: optional string clientIp,
}

struct LoadInfo {
  1: optional double averageLoad,
  2: optional i32 oldGC,
  3: optional i32 threadNum,
  4: optional i32 queueSize,
  5: optional map<string, double> methodQpsMap,
}

struct HeartbeatInfo {
  1: optional string appkey,
  2: optional i64 sendTime,
  3: optional LoadInfo loadInfo,
  4: required i32 status,
}

struct Header {
  1: optional byte messageType,
  2: optional RequestInfo requestInfo,
  3: optional ResponseInfo responseInfo,
  4: optional TraceInfo traceInfo,
  5: optional map<string, string> globalContext,
  6: optional map<string, string> localContext,
  7: optional HeartbeatInfo heartbeatInfo,
}
