// The example service used by the scripts in python/.
exception EchoRefused { 1: string reason }

service Echo {
  string echo(1: string message) throws (1: EchoRefused refused),
  oneway void log(1: string line),
}
