// A grpc-go test pod: the same raw-bytes methods as peer.py's server
// (every method answers each message with "<name>:<message>"), with
// grpc-go's default keepalive enforcement (MinTime 5 minutes, no pings
// without streams). It prints "listening" once serving, and
// "too_many_pings" each time grpc-go's transport ends a connection with
// GOAWAY ENHANCE_YOUR_CALM for pinging faster than that policy allows.
//
//	gopeer NAME PORT
//
// Built by the tests with Debian's Go and grpc-go packages (GOPATH mode,
// no module download).
package main

import (
	"fmt"
	"net"
	"os"
	"strings"
	"sync"

	"google.golang.org/grpc"
	"google.golang.org/grpc/grpclog"
)

// rawCodec passes message bytes through: no .proto needed.
type rawCodec struct{}

func (rawCodec) Marshal(v interface{}) ([]byte, error) { return *(v.(*[]byte)), nil }
func (rawCodec) Unmarshal(data []byte, v interface{}) error {
	*(v.(*[]byte)) = append([]byte(nil), data...)
	return nil
}
func (rawCodec) Name() string   { return "raw" }
func (rawCodec) String() string { return "raw" }

var out sync.Mutex

func say(line string) {
	out.Lock()
	defer out.Unlock()
	fmt.Println(line)
}

// logger reports grpc-go's "too many pings" and drops everything else.
type logger struct{}

func (logger) check(args ...interface{}) {
	if strings.Contains(fmt.Sprint(args...), "too many pings") {
		say("too_many_pings")
	}
}
func (l logger) Info(args ...interface{})                    {}
func (l logger) Infoln(args ...interface{})                  {}
func (l logger) Infof(format string, args ...interface{})    {}
func (l logger) Warning(args ...interface{})                 { l.check(args...) }
func (l logger) Warningln(args ...interface{})               { l.check(args...) }
func (l logger) Warningf(format string, args ...interface{}) { l.check(fmt.Sprintf(format, args...)) }
func (l logger) Error(args ...interface{})                   { l.check(args...) }
func (l logger) Errorln(args ...interface{})                 { l.check(args...) }
func (l logger) Errorf(format string, args ...interface{})   { l.check(fmt.Sprintf(format, args...)) }
func (l logger) Fatal(args ...interface{})                   { l.check(args...); os.Exit(1) }
func (l logger) Fatalln(args ...interface{})                 { l.check(args...); os.Exit(1) }
func (l logger) Fatalf(format string, args ...interface{}) {
	l.check(fmt.Sprintf(format, args...))
	os.Exit(1)
}
func (logger) V(int) bool { return true }

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: gopeer NAME PORT")
		os.Exit(2)
	}
	name, port := os.Args[1], os.Args[2]
	grpclog.SetLoggerV2(logger{})
	lis, err := net.Listen("tcp", "[::]:"+port)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	echo := func(srv interface{}, stream grpc.ServerStream) error {
		for {
			var m []byte
			if err := stream.RecvMsg(&m); err != nil {
				return nil
			}
			reply := append([]byte(name+":"), m...)
			if err := stream.SendMsg(&reply); err != nil {
				return err
			}
		}
	}
	s := grpc.NewServer(grpc.CustomCodec(rawCodec{}), grpc.UnknownServiceHandler(echo))
	say("listening")
	if err := s.Serve(lis); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
