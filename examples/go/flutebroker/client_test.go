package flutebroker

import (
	"bufio"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	pb "flutebroker/tokenbrokerv1"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/health/grpc_health_v1"
)

// broker is a `serve --dev` process (3 s tokens) on a Unix socket and a TCP port.
type broker struct {
	cmd      *exec.Cmd
	emulator string
	targets  map[string]string
}

func startBroker(t *testing.T) *broker {
	bin := os.Getenv("FLUTE_BROKER_BIN")
	if bin == "" {
		t.Fatal("FLUTE_BROKER_BIN is not set")
	}
	sock := filepath.Join(t.TempDir(), "broker.sock")
	cmd := exec.Command(bin, "serve", "--dev", "--dev-token-lifetime", "3s", "--admin-listen", "",
		"--listen", "unix:"+sock, "--listen", "127.0.0.1:0")
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	b := &broker{cmd: cmd, targets: map[string]string{"unix": "unix:" + sock}}
	lines := bufio.NewScanner(stdout)
	for lines.Scan() {
		line := strings.TrimSpace(lines.Text())
		fields := strings.Fields(line)
		if strings.HasPrefix(line, "emulator:") {
			b.emulator = fields[1]
		}
		if strings.HasPrefix(line, "gRPC:") {
			b.targets["tcp"] = fields[len(fields)-1]
		}
		if strings.HasPrefix(line, "Stop with") {
			break
		}
	}
	if b.emulator == "" || b.targets["tcp"] == "" {
		t.Fatal("serve --dev printed no emulator or gRPC address")
	}
	go func() {
		for lines.Scan() {
		}
	}()
	return b
}

func (b *broker) stop(t *testing.T) {
	if err := b.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := b.cmd.Wait(); err != nil {
		t.Fatalf("broker exit: %v", err)
	}
}

func TestAgainstServeDev(t *testing.T) {
	b := startBroker(t)
	defer b.stop(t)
	for _, transport := range []string{"unix", "tcp"} {
		t.Run(transport, func(t *testing.T) {
			client, err := Dial(b.targets[transport])
			if err != nil {
				t.Fatal(err)
			}
			defer client.Close()
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()

			t.Run("GetToken and an API call", func(t *testing.T) {
				token, err := client.GetToken(ctx, "sandbox", 0)
				if err != nil {
					t.Fatal(err)
				}
				if token.GetTokenType() != "Bearer" || len(token.GetTokenId()) != 12 {
					t.Fatalf("unexpected token %v", token.GetTokenId())
				}
				response, err := client.AuthorizedGet(ctx, b.emulator+"/v2/transactions", "sandbox")
				if err != nil {
					t.Fatal(err)
				}
				defer response.Body.Close()
				var body map[string]interface{}
				if response.StatusCode != 200 || json.NewDecoder(response.Body).Decode(&body) != nil || body["transactions"] == nil {
					t.Fatalf("API answered %d", response.StatusCode)
				}
			})

			t.Run("INVALID_ARGUMENT with its reason", func(t *testing.T) {
				_, err := client.GetToken(ctx, "staging", 0)
				brokerErr, ok := err.(*BrokerError)
				if !ok || brokerErr.Code != codes.InvalidArgument || brokerErr.Reason != "ENVIRONMENT_UNSPECIFIED" || brokerErr.Retryable() {
					t.Fatalf("got %#v", err)
				}
			})

			t.Run("WatchToken follows two rotations", func(t *testing.T) {
				watchCtx, stop := context.WithCancel(ctx)
				defer stop()
				var seen []string
				err := client.Watch(watchCtx, "sandbox", func(token *pb.Token) {
					if len(seen) == 0 || seen[len(seen)-1] != token.GetTokenId() {
						seen = append(seen, token.GetTokenId())
					}
					if len(seen) == 3 {
						stop()
					}
				}, func(*pb.Outage) {})
				if err != nil || len(seen) != 3 {
					t.Fatalf("saw %v, err %v", seen, err)
				}
			})

			t.Run("RefreshToken replaces a rejected token", func(t *testing.T) {
				token, err := client.GetToken(ctx, "production", 0)
				if err != nil {
					t.Fatal(err)
				}
				newer, err := client.RefreshToken(ctx, "production", token.GetTokenId())
				if err != nil || newer.GetTokenId() == token.GetTokenId() {
					t.Fatalf("newer %v, err %v", newer.GetTokenId(), err)
				}
			})

			t.Run("health reports SERVING", func(t *testing.T) {
				health := grpc_health_v1.NewHealthClient(client.Conn())
				stream, err := health.Watch(ctx, &grpc_health_v1.HealthCheckRequest{Service: "flute.tokenbroker.v1.TokenBroker"})
				if err != nil {
					t.Fatal(err)
				}
				for {
					reply, err := stream.Recv()
					if err != nil {
						t.Fatal(err)
					}
					if reply.GetStatus() == grpc_health_v1.HealthCheckResponse_SERVING {
						return
					}
				}
			})
		})
	}
}

// startDevOn runs `serve --dev` on sock and returns once its banner is out.
func startDevOn(t *testing.T, sock string) *exec.Cmd {
	cmd := exec.Command(os.Getenv("FLUTE_BROKER_BIN"), "serve", "--dev", "--admin-listen", "", "--listen", "unix:"+sock)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	lines := bufio.NewScanner(stdout)
	for lines.Scan() {
		if strings.HasPrefix(lines.Text(), "Stop with") {
			go func() {
				for lines.Scan() {
				}
			}()
			return cmd
		}
	}
	t.Fatal("serve --dev exited before its banner")
	return nil
}

func waitUntil(t *testing.T, what string, condition func() bool) {
	deadline := time.Now().Add(30 * time.Second)
	for !condition() {
		if time.Now().After(deadline) {
			t.Fatal(what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func inode(t *testing.T, path string) uint64 {
	info, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return info.Sys().(*syscall.Stat_t).Ino
}

// Two brokers on one socket, as a DaemonSet rolling update runs them: the
// follower's stream on the old broker ends with SHUTTING_DOWN, it reconnects
// at once and holds the new broker's current token; GetToken keeps answering.
func TestFollowAndGetTokenSurviveAHandover(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "broker.sock")
	old := startDevOn(t, sock)
	client, err := Dial("unix:" + sock)
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	first, err := client.GetToken(ctx, "sandbox", 0)
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var seen []string
	last := func() string {
		mu.Lock()
		defer mu.Unlock()
		if len(seen) == 0 {
			return ""
		}
		return seen[len(seen)-1]
	}
	follower, err := Dial("unix:" + sock)
	if err != nil {
		t.Fatal(err)
	}
	defer follower.Close()
	followCtx, stopFollowing := context.WithCancel(ctx)
	followed := make(chan error, 1)
	go func() {
		followed <- follower.Follow(followCtx, "sandbox", 30*time.Second, func(token *pb.Token) {
			mu.Lock()
			seen = append(seen, token.GetTokenId())
			mu.Unlock()
		}, func(*pb.Outage) {})
	}()
	waitUntil(t, "the follower has the first token", func() bool { return last() == first.GetTokenId() })
	before := inode(t, sock)
	fresh := startDevOn(t, sock)
	waitUntil(t, "the new broker takes over the socket", func() bool { return inode(t, sock) != before })
	if err := old.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := old.Wait(); err != nil {
		t.Fatalf("old broker exit: %v", err)
	}
	probe, err := Dial("unix:" + sock)
	if err != nil {
		t.Fatal(err)
	}
	current, err := probe.GetToken(ctx, "sandbox", 0)
	probe.Close()
	if err != nil || current.GetTokenId() == first.GetTokenId() {
		t.Fatalf("a new caller reaches the new broker: %v, %v", current.GetTokenId(), err)
	}
	waitUntil(t, "the follower holds the new broker's token", func() bool { return last() == current.GetTokenId() })
	again, err := client.GetToken(ctx, "sandbox", 0)
	if err != nil || again.GetTokenId() != current.GetTokenId() {
		t.Fatalf("the old connection reconnected: %v, %v", again.GetTokenId(), err)
	}
	stopFollowing()
	if err := <-followed; err != nil {
		t.Fatalf("Follow: %v", err)
	}
	if err := fresh.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := fresh.Wait(); err != nil {
		t.Fatalf("new broker exit: %v", err)
	}
}
