package app

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"time"
)

// healthcheckTimeout bounds the whole probe. Docker's own HEALTHCHECK
// timeout is longer, so a hung server shows up as our clear "failed" line
// rather than as Docker killing the probe.
const healthcheckTimeout = 3 * time.Second

// Healthcheck is the `proxy healthcheck` command that the container image
// runs as its HEALTHCHECK: the distroless runtime has no shell, curl or wget,
// so the binary probes itself. It asks GET /healthz on the address in
// LISTEN_ADDR and returns the process exit code: 0 on 200, 1 otherwise, with
// one line on stderr saying why.
//
// It reads only LISTEN_ADDR, never the secrets, so it runs in any container
// the server runs in. /healthz is liveness only: a database outage does not
// mark the container unhealthy (/readyz reports that).
func Healthcheck(ctx context.Context, getenv func(string) string, stderr io.Writer) int {
	addr, err := healthcheckListenAddr(getenv)
	if err != nil {
		fmt.Fprintf(stderr, "healthcheck: %v\n", err)
		return 1
	}
	target, err := healthcheckURL(addr)
	if err != nil {
		fmt.Fprintf(stderr, "healthcheck: LISTEN_ADDR (%q): %v\n", addr, err)
		return 1
	}

	ctx, cancel := context.WithTimeout(ctx, healthcheckTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, target, nil)
	if err != nil {
		fmt.Fprintf(stderr, "healthcheck: %v\n", err)
		return 1
	}
	client := &http.Client{
		// Our own transport: never route a loopback probe through an
		// HTTP(S)_PROXY set for the upstream calls, and keep no idle
		// connection in a process that exits right away.
		Transport: &http.Transport{Proxy: nil, DisableKeepAlives: true},
		// A redirect means something other than the proxy answered.
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
	resp, err := client.Do(req)
	if err != nil {
		fmt.Fprintf(stderr, "healthcheck: GET %s failed: %v\n", target, unwrapURLError(err))
		return 1
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	if resp.StatusCode != http.StatusOK {
		fmt.Fprintf(stderr, "healthcheck: GET %s answered %s\n", target, resp.Status)
		return 1
	}
	return 0
}

// healthcheckListenAddr reads LISTEN_ADDR exactly as LoadConfig does: the
// same trimming, the default from the Settings table, and the same parser,
// so the probe and the server can never disagree about the address.
func healthcheckListenAddr(getenv func(string) string) (string, error) {
	for _, s := range settings {
		if s.Name != "LISTEN_ADDR" {
			continue
		}
		v := strings.TrimSpace(getenv(s.Name))
		if v == "" {
			v = s.Default
		}
		var c Config
		if err := s.parse(&c, v); err != nil {
			return "", fmt.Errorf("%s (%q): %w", s.Name, v, err)
		}
		return c.ListenAddr, nil
	}
	return "", errors.New("LISTEN_ADDR is missing from the settings table")
}

// healthcheckURL turns a listen address into the URL to probe. A server
// bound to every interface (":8080", "0.0.0.0:8080", "[::]:8080") is reached
// on the IPv4 loopback, which also answers for a dual-stack "::" listener.
func healthcheckURL(listenAddr string) (string, error) {
	host, port, err := net.SplitHostPort(listenAddr)
	if err != nil {
		return "", err
	}
	if port == "" {
		return "", errors.New("no port to probe")
	}
	if ip := net.ParseIP(host); host == "" || (ip != nil && ip.IsUnspecified()) {
		host = "127.0.0.1"
	}
	u := url.URL{Scheme: "http", Host: net.JoinHostPort(host, port), Path: "/healthz"}
	return u.String(), nil
}

// unwrapURLError drops the "Get \"http://…\":" prefix that *url.Error adds,
// since our message already names the request.
func unwrapURLError(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		return ue.Err
	}
	return err
}
