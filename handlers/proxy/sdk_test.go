package proxy_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"

	"github.com/openai-idempotent-proxy/proxy/app/apptest"
)

// TestOfficialSDKThroughTheProxy points the official Go SDK at the proxy,
// as users do, and runs chat, streaming chat, embeddings and a file upload.
func TestOfficialSDKThroughTheProxy(t *testing.T) {
	up := apptest.NewUpstream(t)
	px := apptest.Start(t, up.URL, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	client := openai.NewClient(option.WithBaseURL(px.URL+"/v1"), option.WithAPIKey(apptest.ClientKey), option.WithMaxRetries(0))
	params := openai.ChatCompletionNewParams{
		Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("Say hello")},
		Model:    openai.ChatModelGPT4oMini,
	}

	chat, err := client.Chat.Completions.New(ctx, params)
	if err != nil {
		t.Fatalf("chat: %v", err)
	}
	if !strings.HasPrefix(chat.Choices[0].Message.Content, "Hello!") || chat.Usage.TotalTokens != 18 {
		t.Fatalf("chat answer %+v", chat)
	}

	params.StreamOptions = openai.ChatCompletionStreamOptionsParam{IncludeUsage: openai.Bool(true)}
	stream := client.Chat.Completions.NewStreaming(ctx, params, option.WithQuery("test_events", "8"))
	var acc openai.ChatCompletionAccumulator
	chunks := 0
	for stream.Next() {
		acc.AddChunk(stream.Current())
		chunks++
	}
	if err := stream.Err(); err != nil {
		t.Fatalf("stream: %v", err)
	}
	if chunks != 10 || !strings.Contains(acc.Choices[0].Message.Content, "tok7") || acc.Usage.CompletionTokens != 8 {
		t.Fatalf("stream: %d chunks, content %q, usage %+v", chunks, acc.Choices[0].Message.Content, acc.Usage)
	}

	emb, err := client.Embeddings.New(ctx, openai.EmbeddingNewParams{
		Input: openai.EmbeddingNewParamsInputUnion{OfString: openai.String("hello")},
		Model: openai.EmbeddingModelTextEmbedding3Small,
	})
	if err != nil || len(emb.Data) != 1 || emb.Usage.PromptTokens != 8 {
		t.Fatalf("embeddings: %+v %v", emb, err)
	}

	content := strings.Repeat(`{"custom_id":"1","method":"POST","url":"/v1/chat/completions","body":{}}`+"\n", 2000)
	file, err := client.Files.New(ctx, openai.FileNewParams{
		File:    openai.File(strings.NewReader(content), "batch.jsonl", "application/jsonl"),
		Purpose: openai.FilePurposeBatch,
	}, option.WithHeader("Idempotency-Key", "upload-sdk-1"))
	if err != nil || file.Bytes != int64(len(content)) || file.Filename != "batch.jsonl" {
		t.Fatalf("file upload: %+v %v", file, err)
	}

	// Errors keep OpenAI's shape, which the SDK turns into *openai.Error.
	bad := openai.NewClient(option.WithBaseURL(px.URL+"/v1"), option.WithAPIKey("pk-not-a-key-000"), option.WithMaxRetries(0))
	_, err = bad.Models.List(ctx)
	var apiErr *openai.Error
	if !errors.As(err, &apiErr) || apiErr.StatusCode != 401 || apiErr.Code != "invalid_api_key" {
		t.Fatalf("bad key: %v", err)
	}
	if n := up.Calls(); n != 4 {
		t.Fatalf("upstream calls = %d, want 4", n)
	}
	assertNoSecrets(t, "proxy log output", px.Logs.String())

}
