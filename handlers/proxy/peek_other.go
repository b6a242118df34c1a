//go:build !(linux || darwin || freebsd || netbsd || openbsd || dragonfly)

package proxy

const canPeek = false

func peekFD(uintptr) socketState { return socketIdle }
