package proxy

import "testing"

func TestInspectBody(t *testing.T) {
	for _, tc := range []struct {
		name, body string
		want       requestFields
	}{
		{"chat", `{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"stream":true,"max_tokens":7}`,
			requestFields{model: "gpt-4o-mini", stream: true, maxTokens: 7}},
		{"max_completion_tokens wins", `{"max_output_tokens":3,"max_tokens":2,"max_completion_tokens":1,"model":"o3"}`,
			requestFields{model: "o3", maxTokens: 1}},
		{"responses", `{"model":"gpt-4.1","input":"x","max_output_tokens":50}`, requestFields{model: "gpt-4.1", maxTokens: 50}},
		{"nested fields are not the request's", `{"messages":[{"model":"x","max_tokens":9}],"metadata":{"stream":true}}`, requestFields{}},
		{"escaped key", `{"mod\u0065l":"gpt-4o"}`, requestFields{model: "gpt-4o"}},
		{"model twice", `{"model":"gpt-4o-mini","messages":[],"model":"gpt-4.1"}`, requestFields{model: "gpt-4o-mini", duplicate: "model"}},
		{"model twice, once escaped", `{"model":"gpt-4o-mini","mod\u0065l":"gpt-4.1"}`, requestFields{model: "gpt-4o-mini", duplicate: "model"}},
		{"max_tokens twice", `{"max_tokens":1,"max_tokens":100000}`, requestFields{duplicate: "max_tokens", maxTokens: 1}},
		{"not an object", `["model","gpt-4o"]`, requestFields{}},
		{"not JSON", `model=gpt-4o`, requestFields{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := inspectBody([]byte(tc.body)); got != tc.want {
				t.Fatalf("inspectBody(%s) = %+v, want %+v", tc.body, got, tc.want)
			}
		})
	}
}

func TestIsJSON(t *testing.T) {
	for ct, want := range map[string]bool{
		"application/json": true, "application/json; charset=utf-8": true, "Application/JSON": true,
		" application/json ;charset=utf-8": true, "application/merge-patch+json": true,
		"": false, "text/plain": false, "multipart/form-data; boundary=x": false, "application/jsonl": false, "+json": false,
	} {
		if got := isJSON([]byte(ct)); got != want {
			t.Errorf("isJSON(%q) = %v, want %v", ct, got, want)
		}
	}
}
