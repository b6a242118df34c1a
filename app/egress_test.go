package app_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fasthttp/websocket"

	"github.com/openai-idempotent-proxy/proxy/app/apptest"
)

// upstreamHost is a name no DNS knows: only the CONNECT proxy (or the
// test's resolver) can reach it, so nothing leaves the machine.
const upstreamHost = "upstream.test"

// TestEgressProxy: with HTTPS_PROXY set, both HTTP requests and WebSocket
// sessions reach an https upstream through a CONNECT tunnel (TLS end to
// end, verified against UPSTREAM_CA_FILE); with the host in NO_PROXY they
// go directly and the proxy sees nothing.
func TestEgressProxy(t *testing.T) {
	certPEM, cert := selfSignedCert(t, upstreamHost)
	caFile := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(caFile, certPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	up := apptest.NewWSUpstreamWith(t, func(s *httptest.Server) {
		s.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
		s.StartTLS()
	})
	_, port, _ := net.SplitHostPort(up.Listener.Addr().String())
	named := net.JoinHostPort(upstreamHost, port)
	egress := apptest.NewConnectProxy(t, map[string]string{named: up.Listener.Addr().String()})
	base := "https://" + named + "/v1"

	t.Run("through HTTPS_PROXY", func(t *testing.T) {
		in := apptest.Start(t, base, map[string]string{"https_proxy": egress.URL, "UPSTREAM_CA_FILE": caFile})
		callBoth(t, in)
		tunnels := egress.Tunnels()
		if len(tunnels) < 2 {
			t.Fatalf("tunnels %v: want the HTTP call's and the WebSocket's", tunnels)
		}
		for _, tun := range tunnels {
			if tun != "CONNECT "+named {
				t.Fatalf("tunnel %q", tun)
			}
		}
	})
	t.Run("bypassed by NO_PROXY", func(t *testing.T) {
		before := len(egress.Tunnels())
		cfg := apptest.Config(t, base, map[string]string{"HTTPS_PROXY": egress.URL, "NO_PROXY": upstreamHost, "UPSTREAM_CA_FILE": caFile})
		cfg.Egress.Resolver = loopbackResolver{upstreamHost}
		in := apptest.StartConfig(t, cfg)
		callBoth(t, in)
		if after := len(egress.Tunnels()); after != before {
			t.Fatalf("NO_PROXY host went through the proxy: %v", egress.Tunnels()[before:])
		}
	})
}

// callBoth makes one HTTP call and opens one WebSocket session.
func callBoth(t *testing.T, in *apptest.Instance) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, in.URL+"/v1/models", nil)
	req.Header.Set("Authorization", "Bearer "+apptest.ClientKey)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("HTTP through egress: %d", resp.StatusCode)
	}
	c, wresp, err := websocket.DefaultDialer.Dial("ws"+strings.TrimPrefix(in.URL, "http")+"/v1/realtime?model=m",
		http.Header{"Authorization": {"Bearer " + apptest.ClientKey}})
	if err != nil {
		t.Fatalf("WebSocket through egress: %v %v", err, wresp)
	}
	defer c.Close()
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, msg, err := c.ReadMessage(); err != nil || !strings.Contains(string(msg), "session.created") {
		t.Fatalf("first event %s %v", msg, err)
	}
}

// loopbackResolver answers one name with 127.0.0.1 and refuses the rest.
type loopbackResolver struct{ name string }

func (r loopbackResolver) LookupIPAddr(_ context.Context, host string) ([]net.IPAddr, error) {
	if host != r.name {
		return nil, fmt.Errorf("test resolver: unknown host %q", host)
	}
	return []net.IPAddr{{IP: net.IPv4(127, 0, 0, 1)}}, nil
}

func selfSignedCert(t *testing.T, host string) ([]byte, tls.Certificate) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: host}, DNSNames: []string{host},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IsCA: true, BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	keyDER, _ := x509.MarshalECPrivateKey(key)
	cert, err := tls.X509KeyPair(certPEM, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}))
	if err != nil {
		t.Fatal(err)
	}
	return certPEM, cert
}
