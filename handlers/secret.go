package handlers

import (
	"crypto/sha256"
	"crypto/subtle"
)

// SecretDigest is what is kept of a secret to check candidates against:
// its SHA-256. Comparing fixed-size digests in constant time reveals
// neither the secret nor its length through timing.
type SecretDigest [sha256.Size]byte

// DigestSecret returns the digest of secret.
func DigestSecret(secret []byte) SecretDigest { return sha256.Sum256(secret) }

// Matches reports, in constant time, whether candidate is the secret.
func (d SecretDigest) Matches(candidate []byte) bool {
	return d.matchesDigest(DigestSecret(candidate))
}

func (d SecretDigest) matchesDigest(got SecretDigest) bool {
	return subtle.ConstantTimeCompare(got[:], d[:]) == 1
}
