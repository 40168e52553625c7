// grpc-go test peers.
//
//	gopeer NAME PORT
//	gopeer client ADDR N SECONDS
//
// The server (a pod): every method answers each message with
// "<name>:<message>", except .../Tick, a server stream that sends
// "<name>:<i>" every 0.3 s for the seconds its request names (a watch).
// It runs under grpc-go's default keepalive enforcement (MinTime 5
// minutes, no pings without streams), prints "listening" once serving, and
// "too_many_pings" each time grpc-go's transport ends a connection with
// GOAWAY ENHANCE_YOUR_CALM for pinging faster than that policy allows.
//
// The client: one channel with the keepalive gRPC recommends for catching
// dead peers (grpc-go's shortest time, 10 s, and a 1 s timeout), N streams
// for SECONDS, even ones bidi (a message every 0.3 s, echoed), odd ones
// server streams (Tick). It prints {"started":true}, then
// {"streams":[{"pod","code","at","messages"}]} with each stream's pod, its
// final status (OK, UNAVAILABLE, ...) and when it ended, in seconds from
// the start.
//
// Built by the tests with Debian's Go and grpc-go packages (GOPATH mode,
// no module download).
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/grpclog"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/status"
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
	if len(os.Args) == 5 && os.Args[1] == "client" {
		client(os.Args[2], os.Args[3], os.Args[4])
		return
	}
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: gopeer NAME PORT | gopeer client ADDR N SECONDS")
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
		method, _ := grpc.MethodFromServerStream(stream)
		if strings.HasSuffix(method, "/Tick") {
			var m []byte
			if err := stream.RecvMsg(&m); err != nil {
				return err
			}
			secs, _ := strconv.ParseFloat(string(m), 64)
			stop := time.Now().Add(time.Duration(secs * float64(time.Second)))
			for i := 0; time.Now().Before(stop); i++ {
				reply := []byte(fmt.Sprintf("%s:%d", name, i))
				if err := stream.SendMsg(&reply); err != nil {
					return err
				}
				time.Sleep(300 * time.Millisecond)
			}
			return nil
		}
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

type result struct {
	Pod      *string  `json:"pod"`
	Code     *string  `json:"code"`
	At       *float64 `json:"at"`
	Messages int      `json:"messages"`
}

func codeName(err error) string {
	switch c := status.Code(err); c {
	case codes.OK:
		return "OK"
	case codes.Unavailable:
		return "UNAVAILABLE"
	case codes.Canceled:
		return "CANCELLED"
	case codes.Internal:
		return "INTERNAL"
	case codes.DeadlineExceeded:
		return "DEADLINE_EXCEEDED"
	default:
		return c.String()
	}
}

func client(addr, nArg, secsArg string) {
	n, _ := strconv.Atoi(nArg)
	secs, _ := strconv.ParseFloat(secsArg, 64)
	conn, err := grpc.Dial(addr,
		grpc.WithInsecure(),
		grpc.WithBlock(),
		grpc.WithKeepaliveParams(keepalive.ClientParameters{
			Time: 10 * time.Second, Timeout: time.Second, PermitWithoutStream: true,
		}),
		grpc.WithDefaultCallOptions(grpc.ForceCodec(rawCodec{})))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	defer conn.Close()
	start := time.Now()
	run := time.Duration(secs * float64(time.Second))
	out := make([]result, n)
	var wg sync.WaitGroup
	var mu sync.Mutex
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), run+30*time.Second)
			defer cancel()
			bidi := i%2 == 0
			method := "/lbt.Peer/Bidi"
			if !bidi {
				method = "/lbt.Peer/Tick"
			}
			desc := &grpc.StreamDesc{ServerStreams: true, ClientStreams: bidi}
			finish := func(err error) {
				mu.Lock()
				defer mu.Unlock()
				code := "OK"
				if err != nil && err != io.EOF {
					code = codeName(err)
				}
				at := time.Since(start).Seconds()
				out[i].Code, out[i].At = &code, &at
			}
			cs, err := conn.NewStream(ctx, desc, method)
			if err != nil {
				finish(err)
				return
			}
			if bidi {
				go func() {
					stop := start.Add(run)
					for time.Now().Before(stop) {
						m := []byte("m")
						if cs.SendMsg(&m) != nil {
							return
						}
						time.Sleep(300 * time.Millisecond)
					}
					_ = cs.CloseSend()
				}()
			} else {
				m := []byte(strconv.FormatFloat(run.Seconds()-time.Since(start).Seconds(), 'f', 3, 64))
				if err := cs.SendMsg(&m); err != nil {
					finish(err)
					return
				}
				_ = cs.CloseSend()
			}
			for {
				var reply []byte
				if err := cs.RecvMsg(&reply); err != nil {
					finish(err)
					return
				}
				pod := strings.SplitN(string(reply), ":", 2)[0]
				mu.Lock()
				out[i].Pod = &pod
				out[i].Messages++
				mu.Unlock()
			}
		}(i)
		time.Sleep(50 * time.Millisecond)
	}
	say(`{"started": true}`)
	wg.Wait()
	b, _ := json.Marshal(map[string][]result{"streams": out})
	say(string(b))
}
