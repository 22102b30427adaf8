// Package flutebroker is a copyable Go client for flute-token-broker.
//
// It needs the stubs protoc generates from the broker's proto into the
// package flutebroker/tokenbrokerv1 (see ../README.md and ../test.sh), and
// grpc-go with its default dial options, over a Unix socket
// ("unix:/run/flute-token-broker/broker.sock") or TCP ("127.0.0.1:50051").
//
// Every failure is a *BrokerError whose Reason is the stable
// google.rpc.ErrorInfo reason the broker attaches (listed in the proto);
// branch on it, never on the message text.
package flutebroker

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"time"

	pb "flutebroker/tokenbrokerv1"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
)

// ErrorDomain is the ErrorInfo domain of the broker's errors.
const ErrorDomain = "tokenbroker.flute.com"

// BrokerError is a failed broker call: the gRPC code, the broker's stable
// reason ("" for transport errors, which carry no ErrorInfo), the reason's
// metadata (such as "environment") and the suggested retry delay.
type BrokerError struct {
	Code       codes.Code
	Message    string
	Reason     string
	Metadata   map[string]string
	RetryAfter time.Duration // zero when the broker suggests none
}

func (e *BrokerError) Error() string { return fmt.Sprintf("%s: %s", e.Code, e.Message) }

// Retryable says whether the same call can succeed later.
func (e *BrokerError) Retryable() bool {
	switch e.Reason {
	case "NO_VALID_TOKEN", "TOKEN_WAIT_EXCEEDED", "SHUTTING_DOWN":
		return true
	}
	return false
}

// AsBrokerError turns a gRPC error into a *BrokerError.
func AsBrokerError(err error) *BrokerError {
	st := status.Convert(err)
	out := &BrokerError{Code: st.Code(), Message: st.Message()}
	for _, detail := range st.Details() {
		switch d := detail.(type) {
		case *errdetails.ErrorInfo:
			if d.GetDomain() == ErrorDomain {
				out.Reason, out.Metadata = d.GetReason(), d.GetMetadata()
			}
		case *errdetails.RetryInfo:
			out.RetryAfter = d.GetRetryDelay().AsDuration()
		}
	}
	return out
}

// Client talks to one broker.
type Client struct {
	conn *grpc.ClientConn
	Stub pb.TokenBrokerClient
}

// Dial connects to the broker at target with default options (plaintext:
// the Unix socket's permissions, or the network, guard the broker).
func Dial(target string) (*Client, error) {
	conn, err := grpc.Dial(target, grpc.WithInsecure())
	if err != nil {
		return nil, err
	}
	return &Client{conn: conn, Stub: pb.NewTokenBrokerClient(conn)}, nil
}

// Conn is the underlying connection (for the health service, for example).
func (c *Client) Conn() *grpc.ClientConn { return c.conn }

// Close closes the connection.
func (c *Client) Close() error { return c.conn.Close() }

// Environment maps "sandbox" / "production" to the proto enum.
func Environment(name string) pb.Environment {
	switch name {
	case "sandbox":
		return pb.Environment_ENVIRONMENT_SANDBOX
	case "production":
		return pb.Environment_ENVIRONMENT_PRODUCTION
	}
	return pb.Environment_ENVIRONMENT_UNSPECIFIED
}

// GetToken returns the current token (a memory read in the broker), or a
// *BrokerError such as NO_VALID_TOKEN (retry after RetryAfter) or
// ENVIRONMENT_NOT_ENABLED / CALLER_NOT_ALLOWED (retrying cannot help).
// minRemaining, when positive, asks for a token with at least that long left.
func (c *Client) GetToken(ctx context.Context, environment string, minRemaining time.Duration) (*pb.Token, error) {
	request := &pb.GetTokenRequest{Environment: Environment(environment)}
	if minRemaining > 0 {
		request.MinRemaining = durationpb.New(minRemaining)
	}
	reply, err := c.Stub.GetToken(ctx, request, waitForReady)
	if err != nil {
		return nil, AsBrokerError(err)
	}
	return reply.GetToken(), nil
}

// waitForReady: a broker started by hand or restarted without systemd's
// socket (or between a DaemonSet's pods) is briefly not listening; a call
// then waits for it until its context ends instead of failing at once.
// Under socket activation or the DaemonSet handover the default
// (fail-fast) never sees a gap; this costs nothing there.
var waitForReady = grpc.WaitForReady(true)

// GetTokenWaiting is GetToken that waits out retryable failures until ctx
// ends, sleeping as the broker's RetryInfo suggests (else one second).
func (c *Client) GetTokenWaiting(ctx context.Context, environment string) (*pb.Token, error) {
	for {
		token, err := c.GetToken(ctx, environment, 0)
		if err == nil {
			return token, nil
		}
		brokerErr := err.(*BrokerError)
		if !brokerErr.Retryable() {
			return nil, err
		}
		wait := brokerErr.RetryAfter
		if wait <= 0 {
			wait = time.Second
		}
		select {
		case <-ctx.Done():
			return nil, err
		case <-time.After(wait):
		}
	}
}

// RefreshToken reports a token the API answered 401 to and returns a newer one.
func (c *Client) RefreshToken(ctx context.Context, environment, rejectedTokenID string) (*pb.Token, error) {
	reply, err := c.Stub.RefreshToken(ctx, &pb.RefreshTokenRequest{
		Environment:     Environment(environment),
		RejectedTokenId: rejectedTokenID,
	}, waitForReady)
	if err != nil {
		return nil, AsBrokerError(err)
	}
	return reply.GetToken(), nil
}

// Watch calls onToken for each rotation and onOutage for each outage, the
// current state first, until ctx ends (nil) or the stream fails (a
// *BrokerError; a restarting broker: call Watch again).
func (c *Client) Watch(ctx context.Context, environment string, onToken func(*pb.Token), onOutage func(*pb.Outage)) error {
	stream, err := c.Stub.WatchToken(ctx, &pb.WatchTokenRequest{Environment: Environment(environment)}, waitForReady)
	if err != nil {
		return AsBrokerError(err)
	}
	for {
		update, err := stream.Recv()
		if err == io.EOF || ctx.Err() != nil {
			return nil
		}
		if err != nil {
			return AsBrokerError(err)
		}
		if token := update.GetToken(); token != nil {
			onToken(token)
		} else if outage := update.GetOutage(); outage != nil {
			onOutage(outage)
		}
	}
}

// Follow is Watch for ever, until ctx ends (nil): when the broker ends the
// stream because it stops or restarts (reason SHUTTING_DOWN) it reconnects
// at once, to the successor or another replica, and the current token
// comes first again; when the broker cannot be reached it retries after
// 1 s, 2 s, 4 s ... up to maxBackoff. Any other error is returned.
func (c *Client) Follow(ctx context.Context, environment string, maxBackoff time.Duration, onToken func(*pb.Token), onOutage func(*pb.Outage)) error {
	var backoff time.Duration
	for {
		err := c.Watch(ctx, environment, func(token *pb.Token) {
			backoff = 0
			onToken(token)
		}, func(outage *pb.Outage) {
			backoff = 0
			onOutage(outage)
		})
		if ctx.Err() != nil {
			return nil
		}
		brokerErr, _ := err.(*BrokerError)
		switch {
		case brokerErr != nil && brokerErr.Reason == "SHUTTING_DOWN":
			continue
		case err != nil && (brokerErr == nil || brokerErr.Reason != "" || brokerErr.Code != codes.Unavailable):
			return err
		}
		backoff *= 2
		if backoff < time.Second {
			backoff = time.Second
		}
		if backoff > maxBackoff {
			backoff = maxBackoff
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(backoff):
		}
	}
}

// AuthorizedGet GETs url with a bearer token; on 401 it asks the broker for
// a newer token and retries once.
func (c *Client) AuthorizedGet(ctx context.Context, url, environment string) (*http.Response, error) {
	token, err := c.GetToken(ctx, environment, 0)
	if err != nil {
		return nil, err
	}
	for attempt := 0; ; attempt++ {
		request, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if err != nil {
			return nil, err
		}
		request.Header.Set("Authorization", "Bearer "+token.GetAccessToken())
		response, err := http.DefaultClient.Do(request)
		if err != nil || response.StatusCode != http.StatusUnauthorized || attempt == 1 {
			return response, err
		}
		response.Body.Close()
		if token, err = c.RefreshToken(ctx, environment, token.GetTokenId()); err != nil {
			return nil, err
		}
	}
}
