package scrub

import (
	"bytes"
	"fmt"
	"io"
	"math/rand/v2"
	"testing"
)

// sseText is about 64 KiB of chat-completion chunks, as an upstream streams
// them, with no secret in it.
func sseText() []byte {
	var b bytes.Buffer
	for i := 0; b.Len() < 64<<10; i++ {
		fmt.Fprintf(&b, "data: {\"id\":\"chatcmpl-9x8Yz%d\",\"object\":\"chat.completion.chunk\",\"created\":1733000000,"+
			"\"model\":\"gpt-4o-mini-2024-07-18\",\"system_fingerprint\":\"fp_0ba0d124f1\",\"choices\":[{\"index\":0,"+
			"\"delta\":{\"content\":\" token%d\"},\"logprobs\":null,\"finish_reason\":null}]}\n\n", i, i)
	}
	return b.Bytes()[:64<<10]
}

// benchSecrets returns an upstream key and n-1 client keys of 24 to 48
// random characters, with no common prefix.
func benchSecrets(n int) []string {
	rng := rand.New(rand.NewPCG(1, 2))
	const alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_"
	random := func(size int) string {
		b := make([]byte, size)
		for i := range b {
			b[i] = alphabet[rng.IntN(len(alphabet))]
		}
		return string(b)
	}
	s := []string{"sk-proj-" + random(48)}
	for len(s) < n {
		s = append(s, random(24+rng.IntN(25)))
	}
	return s
}

// BenchmarkReader streams 64 KiB of SSE through a masking Reader with a
// 4 KiB buffer, as the proxy's body copy does.
func BenchmarkReader(b *testing.B) {
	data := sseText()
	for _, n := range []int{1, 200} {
		b.Run(fmt.Sprintf("secrets=%d", n), func(b *testing.B) {
			m := New(benchSecrets(n)...)
			buf := make([]byte, 4096)
			b.SetBytes(int64(len(data)))
			b.ReportAllocs()
			for b.Loop() {
				r := m.Reader(bytes.NewReader(data))
				for {
					if _, err := r.Read(buf); err == io.EOF {
						break
					}
				}
			}
		})
	}
}

// BenchmarkBytes masks 64 KiB of SSE in one call.
func BenchmarkBytes(b *testing.B) {
	data := sseText()
	for _, n := range []int{1, 200} {
		b.Run(fmt.Sprintf("secrets=%d", n), func(b *testing.B) {
			m := New(benchSecrets(n)...)
			b.SetBytes(int64(len(data)))
			b.ReportAllocs()
			for b.Loop() {
				m.Bytes(data)
			}
		})
	}
}

// BenchmarkStrategy compares the two searches by number of secrets; it
// chose fewSecrets.
func BenchmarkStrategy(b *testing.B) {
	data := sseText()
	for _, n := range []int{1, 2, 4, 8, 16, 200} {
		for name, m := range strategies(benchSecrets(n)) {
			b.Run(fmt.Sprintf("%s/secrets=%d", name, n), func(b *testing.B) {
				b.SetBytes(int64(len(data)))
				for b.Loop() {
					m.Bytes(data)
				}
			})
		}
	}
}
