package wsproxy_test

import (
	"context"
	"encoding/json"
	"testing"
	"time"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"

	"github.com/openai-idempotent-proxy/proxy/app/apptest"
)

// TestOpenAIGoResponsesWebSocket drives the Responses API's WebSocket mode
// through the proxy with the official Go SDK (openai-go v3, the
// client.Beta.Responses.Connect API), authenticated with a proxy key.
func TestOpenAIGoResponsesWebSocket(t *testing.T) {
	in, up := start(t, nil)
	client := openai.NewClient(option.WithBaseURL(in.URL+"/v1"), option.WithAPIKey(apptest.ClientKey))
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	conn, err := client.Beta.Responses.Connect(ctx, openai.BetaResponseConnectionOptions{})
	if err != nil {
		t.Fatalf("connect through the proxy: %v", err)
	}
	defer conn.Abort()
	for round := 0; round < 2; round++ { // one socket, several responses
		if err := conn.SendRaw(ctx, json.RawMessage(`{"type":"response.create","model":"gpt-test-ws","input":"hi"}`)); err != nil {
			t.Fatal(err)
		}
		var types []string
		for len(types) == 0 || types[len(types)-1] != "response.completed" {
			event, err := conn.Recv(ctx)
			if err != nil {
				t.Fatalf("recv after %v: %v", types, err)
			}
			types = append(types, event.Type)
		}
		if len(types) != 3 {
			t.Fatalf("events %v", types)
		}
	}
	if err := conn.Close(); err != nil {
		t.Fatalf("close: %v", err)
	}
	s := up.Sessions()[0]
	ended(t, s)
	if s.Path != "/v1/responses" || s.Header.Get("Authorization") != "Bearer "+apptest.UpstreamKey {
		t.Fatalf("upstream saw %s with %q", s.Path, s.Header.Get("Authorization"))
	}
	row := sessionRow(t, in, "/v1/responses")
	if row.Status != 101 || row.Client != "alpha" || row.Model != "gpt-test-ws" {
		t.Fatalf("row %+v", row)
	}
	if row.PromptTokens != 2*apptest.ResponsesInputTokens || row.CompletionTokens != 2*apptest.ResponsesOutputTokens ||
		row.TotalTokens != 24 || row.CachedTokens != 2*apptest.ResponsesCachedTokens || row.ReasoningTokens != 2 {
		t.Fatalf("usage summed over the session: %d/%d/%d cached %d reasoning %d",
			row.PromptTokens, row.CompletionTokens, row.TotalTokens, row.CachedTokens, row.ReasoningTokens)
	}
}
