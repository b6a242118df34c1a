package handlers

import (
	"net"
	"net/url"
	"time"

	"github.com/valyala/fasthttp"
	"github.com/valyala/fasthttp/fasthttpproxy"
	"golang.org/x/net/http/httpproxy"
)

// Egress is how connections to the upstream leave the host: directly, or
// through the outbound proxy HTTPS_PROXY / HTTP_PROXY name, unless NO_PROXY
// exempts the host. The semantics are Go's (golang.org/x/net/http/httpproxy):
// HTTPS_PROXY applies to https (and wss) upstreams, HTTP_PROXY to http (and
// ws) ones, NO_PROXY lists hosts, domains (with their subdomains), IP
// prefixes and CIDRs, or "*"; loopback addresses and "localhost" are never
// proxied. An http:// proxy is spoken to with CONNECT, so TLS to the
// upstream runs end to end through the tunnel; socks5:// works too.
//
// Both the HTTP client and the WebSocket dialer dial through it, so every
// upstream connection takes the same way out.
type Egress struct {
	Proxy httpproxy.Config
	// Resolver looks host names up; nil uses the system resolver. Tests set
	// it to keep name lookups on the machine.
	Resolver fasthttp.Resolver
}

// DialFunc returns a dialer for "host:port" upstream addresses. tls tells
// whether the upstream is https (which picks HTTPS_PROXY over HTTP_PROXY);
// timeout bounds the TCP connect and, through a proxy, its CONNECT answer.
func (e Egress) DialFunc(tls bool, timeout time.Duration) func(addr string) (net.Conn, error) {
	d := &fasthttpproxy.Dialer{
		TCPDialer:      fasthttp.TCPDialer{Resolver: e.Resolver},
		Config:         e.Proxy,
		Timeout:        timeout,
		ConnectTimeout: timeout,
	}
	dial, err := d.GetDialFuncForTLS(false, tls)
	if err != nil {
		// Only a proxy URL that does not parse gets here; the settings
		// check it at start, so this is a programming error surfaced
		// on every dial rather than a silent direct connection.
		return func(string) (net.Conn, error) { return nil, err }
	}
	return dial
}

// ProxyFor returns the proxy connections to upstream go through, nil when
// they go directly (for the start-up log line).
func (e Egress) ProxyFor(upstream *url.URL) *url.URL {
	u, err := e.Proxy.ProxyFunc()(upstream)
	if err != nil {
		return nil
	}
	return u
}
