package wsproxy_test

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/openai-idempotent-proxy/proxy/app/apptest"
)

// TestRealtimeClientSecrets: the documented browser pattern. An app's
// backend mints a short-lived Realtime secret with POST
// /v1/realtime/client_secrets through the proxy, with its proxy key; the
// proxy sends the server's key upstream, and only the ephemeral secret
// comes back, for the browser to use.
func TestRealtimeClientSecrets(t *testing.T) {
	var gotAuth, gotBody, gotPath string
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		gotAuth, gotPath = r.Header.Get("Authorization"), r.URL.Path
		b, _ := io.ReadAll(r.Body)
		gotBody = string(b)
		w.Header().Set("Content-Type", "application/json")
		_, _ = io.WriteString(w, `{"value":"ek_test_ephemeral","expires_at":1767225600,"session":{"type":"realtime","model":"gpt-realtime"}}`)
	}))
	defer up.Close()
	in := apptest.Start(t, up.URL+"/v1", nil)

	body := `{"expires_after":{"anchor":"created_at","seconds":600},"session":{"type":"realtime","model":"gpt-realtime"}}`
	req, _ := http.NewRequest(http.MethodPost, in.URL+"/v1/realtime/client_secrets", strings.NewReader(body))
	req.Header.Set("Authorization", "Bearer "+apptest.ClientKey)
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var secret struct{ Value string }
	raw, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 || json.Unmarshal(raw, &secret) != nil || secret.Value != "ek_test_ephemeral" {
		t.Fatalf("status %d body %s", resp.StatusCode, raw)
	}
	if gotAuth != "Bearer "+apptest.UpstreamKey || gotPath != "/v1/realtime/client_secrets" || gotBody != body {
		t.Fatalf("upstream saw %q %q %q", gotAuth, gotPath, gotBody)
	}
	if strings.Contains(string(raw), apptest.UpstreamKey) || strings.Contains(string(raw), apptest.ClientKey) {
		t.Fatal("a key reached the answer")
	}
}
