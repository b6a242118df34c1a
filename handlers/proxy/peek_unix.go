//go:build linux || darwin || freebsd || netbsd || openbsd || dragonfly

package proxy

import "syscall"

// canPeek reports whether sockets can be peeked at on this platform.
const canPeek = true

// peekFD looks at a socket without consuming anything and without blocking.
func peekFD(fd uintptr) socketState {
	var b [1]byte
	n, _, err := syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
	switch {
	case err == syscall.EAGAIN || err == syscall.EWOULDBLOCK || err == syscall.EINTR:
		return socketIdle
	case err != nil || n == 0:
		return socketClosed
	}
	return socketData
}
